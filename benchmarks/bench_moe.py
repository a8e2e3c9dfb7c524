"""MoE DiT step cost vs the dense DiT at equal active FLOPs (one process, plain PyTorch loop, fp32).

    python benchmarks/bench_moe.py [--model DiT-S/2] [--input-size 32] [--batch 8] [--experts 4] [--top-k 1]
                                   [--rounds 5] [--steps 2] [--out benchmarks/results/moe.json]

The MoE model replaces every block's FFN by ``models/moe.py``'s ``MoEFeedForward`` with ``--experts`` experts of
the dense FFN's width and top-k routing; with top-1 its active FLOPs per token equal the dense model's plus the
router (models' ``flops_per_sample`` counts active FLOPs). Both train with AdamW + clipping on the same batch;
steps are interleaved round by round and the median step time is reported, with the ratio MoE / dense.
The gap is the routing work the FLOP count ignores: top-k, capacity masks, gathers (index_select), scatters
(index_add), per-expert GEMMs on fewer rows, the balance loss, and the optimizer over E× more FFN weights.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_results  # noqa: E402

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "moe.json"))
    args = ap.parse_args(argv)

    from models.args import preset_kwargs
    from models.dit import DiT
    from trainer.loop.trainer import param_groups

    base = dict(preset_kwargs(args.model), input_size=args.input_size, in_channels=4, num_classes=1000)
    moe = {"num_experts": args.experts, "top_k": args.top_k, "capacity_factor": args.capacity_factor}
    variants = {"dense": base, f"moe_e{args.experts}_top{args.top_k}": dict(base, moe=moe)}
    runners = {}
    for name, kw in variants.items():
        torch.manual_seed(0)
        model = DiT(**kw)
        opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
        runners[name] = (model, opt)
    g = torch.Generator().manual_seed(0)
    n, s = args.batch, args.input_size
    x, t = torch.randn(n, 4, s, s, generator=g), torch.randint(0, 1000, (n,), generator=g)
    y, target = torch.randint(0, 1000, (n,), generator=g), torch.randn(n, 8, s, s, generator=g)

    def step(model, opt) -> float:
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x, t, y), target) + model.moe_aux_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for model, opt in runners.values():
        step(model, opt)
    times = {name: [] for name in runners}
    loads = []
    for rnd in range(args.rounds):
        for name in (list(runners) if rnd % 2 == 0 else list(reversed(runners))):
            times[name] += [step(*runners[name]) for _ in range(args.steps)]
        loads.append(os.getloadavg()[0])
        print(f"round {rnd + 1}/{args.rounds} load {loads[-1]:.2f}", flush=True)
    rows = []
    dense_t = statistics.median(times["dense"])
    for name, (model, _) in runners.items():
        med = statistics.median(times[name])
        flops = model.flops_per_sample(train=True)
        rows.append({"variant": name, "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "train_gflops_per_sample": flops / 1e9, "median_step_s": med, "samples_per_sec": n / med,
                     "step_time_vs_dense": med / dense_t, "achieved_gflops": flops * n / med / 1e9,
                     "steps_timed": len(times[name])})
    print(f"\n{args.model}, latent {s}×{s}, batch {n}, fp32, {torch.get_num_threads()} threads; median of "
          f"{args.rounds} interleaved rounds × {args.steps} steps")
    print(f"{'variant':<16}{'params M':>9}{'GFLOP/smp':>11}{'s/step':>8}{'samples/s':>11}{'× dense time':>14}{'GFLOP/s':>9}")
    for r in rows:
        print(f"{r['variant']:<16}{r['params'] / 1e6:>9.1f}{r['train_gflops_per_sample']:>11.1f}{r['median_step_s']:>8.3f}"
              f"{r['samples_per_sec']:>11.2f}{r['step_time_vs_dense']:>14.3f}{r['achieved_gflops']:>9.1f}")
    load = os.getloadavg()
    print(f"load average {load}")
    record = {"command": "python benchmarks/bench_moe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(), "load_average_per_round": loads,
                          "load_average_at_end": load},
              "moe": moe, "results": rows}
    write_results(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
