"""DeepSpeed ZeRO step vs a plain PyTorch loop, one process, same model, same AdamW + clipping.

    python benchmarks/bench_zero.py [--model DiT-S/2] [--input-size 32] [--batch 8] [--rounds 5] [--steps 3]
                                    [--variants plain zero1 zero2 zero3 ...] [--profile zero2]
                                    [--out benchmarks/results/zero_overhead.json]

Every variant trains the same DiT (fp32, seed 0) on the same fixed batch with the trainer's parameter groups
and AdamW settings (trainer/engine/optimizer.py ``param_groups``/``optimizer_config``) and gradient clipping at 1.0:

  plain     model(x, t, y) → MSE → loss.backward() → clip_grad_norm_ → torch.optim.AdamW.step → zero_grad
  zeroN     the same through the trainer's ``initialize_engine`` (``deepspeed.initialize`` + the fp32 master
            aliasing of trainer/engine/zero_master.py) with configs/zeroN.json filled by fill_ds_config
  *_stock   the DeepSpeed defaults for that stage (no tuning), for comparison with the tuned JSONs

Timing is interleaved: each round runs ``--steps`` steps of every variant in turn (after one warm-up step
each), so load from other jobs on the machine hits all variants alike; the figure per variant is the median
step time over rounds, and the table reports samples/s and the ratio to the plain loop in the same run, both
as a ratio of medians and paired (per round, plain's median ÷ the variant's, then the median over rounds).
``zeroN_noalias`` builds the engine without trainer/engine/zero_master.py's aliasing of the fp32 master partition
(DeepSpeed as shipped), for the before/after of that change.
Forward / backward / optimizer-step times are measured separately (perf_counter around each call).
ZeRO-3 variants run in their own invocation: a ZeRO-3 engine patches ``torch.nn.functional.linear``
process-wide, which would also slow the plain loop and the other stages built beside it.
``--profile VARIANT`` prints the torch.profiler table of one step of that variant (where the time goes).
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

STOCK = {
    "zero1_stock": {"zero_optimization": {"stage": 1}},
    "zero2_stock": {"zero_optimization": {"stage": 2}},
    "zero3_stock": {"zero_optimization": {"stage": 3}},
    "zero0": {"zero_optimization": {"stage": 0}},
    "zero2_nocontig": {"zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": False,
                                             "reduce_scatter": True, "reduce_bucket_size": 50000000,
                                             "allgather_bucket_size": 50000000}},
}


def _init_single_process():
    from trainer.engine.distributed import free_port, init_local_gloo_rank

    init_local_gloo_rank(0, 1, free_port())


def _cfg(batch: int):
    from trainer.config.schema import load_config

    return load_config(None, ["train.precision=fp32", f"train.micro_batch={batch}", f"train.global_batch={batch}",
                              "train.grad_clip=1.0", "train.lr=1e-4", "train.weight_decay=0.0"])


def _model(kw: dict):
    from models.dit import DiT

    torch.manual_seed(0)
    return DiT(**kw)


class Plain:
    def __init__(self, kw: dict, batch: int):
        from trainer.loop.trainer import param_groups

        cfg = _cfg(batch)
        self.model = _model(kw)
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.train.weight_decay), lr=cfg.train.lr,
                                     betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps,
                                     fused=cfg.train.fused_adamw)
        self.clip = cfg.train.grad_clip

    def forward(self, x, t, y):
        return self.model(x, t, y)

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Engine:
    def __init__(self, kw: dict, batch: int, ds_raw: dict, alias_master: bool = True):
        import deepspeed

        from trainer.config.ds_json import fill_ds_config
        from trainer.engine.optimizer import optimizer_config, param_groups
        from trainer.engine.parallelize import initialize_engine

        cfg = _cfg(batch)
        ds = fill_ds_config(ds_raw, cfg, global_batch=batch, micro_batch=batch, data_parallel=1, on_cuda=False)
        ds["optimizer"] = optimizer_config(cfg)
        self.ds = ds
        model = _model(kw)
        if alias_master:  # as the trainer builds it
            self.engine, *_ = initialize_engine(model=model, model_parameters=param_groups(model, 0.0), config=ds)
        else:  # DeepSpeed as shipped
            self.engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=ds)

    def forward(self, x, t, y):
        return self.engine(x, t, y)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()


def build(name: str, kw: dict, batch: int):
    from trainer.config.ds_json import load_ds_config

    if name == "plain":
        return Plain(kw, batch)
    base, alias = (name[:-len("_noalias")], False) if name.endswith("_noalias") else (name, True)
    if base in STOCK:
        return Engine(kw, batch, STOCK[base], alias)
    return Engine(kw, batch, load_ds_config(f"{base}.json"), alias)


def one_step(runner, x, t, y, target) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    out = runner.forward(x, t, y)
    loss = torch.nn.functional.mse_loss(out, target)
    t1 = time.perf_counter()
    runner.backward(loss)
    t2 = time.perf_counter()
    runner.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    ap.add_argument("--variants", nargs="+", default=["plain", "zero1", "zero2", "zero3", "zero2_stock"])
    ap.add_argument("--profile", default=None, help="print a torch.profiler table for one step of this variant")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "zero_overhead.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _init_single_process()
    from models.args import preset_kwargs

    kw = dict(preset_kwargs(args.model), input_size=args.input_size, in_channels=4, num_classes=1000)
    g = torch.Generator().manual_seed(0)
    n, s = args.batch, args.input_size
    x = torch.randn(n, 4, s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 1000, (n,), generator=g)
    target = torch.randn(n, 8, s, s, generator=g)

    stage3 = [v for v in args.variants if v.startswith("zero3")]
    if stage3 and len(stage3) != len([v for v in args.variants if v != "plain"]):
        # building a ZeRO-3 engine patches torch.nn.functional.linear process-wide (DeepSpeed's
        # LinearFunctionForZeroStage3), which would slow every other variant built in the same process
        print(f"error: run ZeRO-3 variants {stage3} in their own invocation (with plain), not beside other stages",
              file=sys.stderr)
        return 2
    runners = {name: build(name, kw, args.batch) for name in args.variants}
    for r in runners.values():  # warm-up: allocations, optimizer state creation, DeepSpeed buffers
        one_step(r, x, t, y, target)
    times = {name: [] for name in runners}
    parts = {name: [] for name in runners}
    loads = []
    for rnd in range(args.rounds):
        order = list(runners) if rnd % 2 == 0 else list(reversed(runners))
        for name in order:
            for _ in range(args.steps):
                f, b, st = one_step(runners[name], x, t, y, target)
                times[name].append(f + b + st)
                parts[name].append((f, b, st))
        loads.append(os.getloadavg()[0])
        print(f"round {rnd + 1}/{args.rounds} load {loads[-1]:.2f}", flush=True)

    plain = statistics.median(times["plain"]) if "plain" in times else None

    def paired_ratio(name):
        """Median over rounds of plain's ÷ this variant's round-median step time: both saw the same load."""
        k = args.steps
        return statistics.median(statistics.median(times["plain"][r * k:(r + 1) * k])
                                 / statistics.median(times[name][r * k:(r + 1) * k]) for r in range(args.rounds))

    rows = []
    for name in runners:
        med = statistics.median(times[name])
        f, b, st = (statistics.median(p[i] for p in parts[name]) for i in range(3))
        rows.append({"variant": name, "median_step_s": med, "samples_per_sec": args.batch / med,
                     "ratio_to_plain": plain / med if plain else None,
                     "paired_ratio_to_plain": paired_ratio(name) if plain else None, "forward_s": f, "backward_s": b, "step_s": st,
                     "overhead_s": med - plain if plain else None, "steps_timed": len(times[name]),
                     "ds_config": getattr(runners[name], "ds", None)})
    print(f"\n{args.model}, latent {s}×{s}, batch {n}, fp32, one process, {torch.get_num_threads()} torch threads; "
          f"median of {args.rounds} interleaved rounds × {args.steps} steps")
    print(f"{'variant':<14}{'s/step':>8}{'samples/s':>11}{'× plain':>9}{'paired':>8}{'fwd s':>8}{'bwd s':>8}{'step s':>8}{'+s':>8}")
    for r in rows:
        print(f"{r['variant']:<14}{r['median_step_s']:>8.3f}{r['samples_per_sec']:>11.2f}"
              f"{(r['ratio_to_plain'] or 0):>9.3f}{(r['paired_ratio_to_plain'] or 0):>8.3f}{r['forward_s']:>8.3f}{r['backward_s']:>8.3f}{r['step_s']:>8.3f}"
              f"{(r['overhead_s'] or 0):>+8.3f}")
    load = os.getloadavg()
    print(f"load average {load}")

    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        r = runners[args.profile]
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step(r, x, t, y, target)
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(f"\ntorch.profiler, one step of {args.profile} (self CPU time):\n{profile}")

    try:
        cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except (OSError, IndexError):
        cpu = platform.processor()
    record = {
        "command": "python benchmarks/bench_zero.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_per_round": loads, "load_average_at_end": load},
        "model": args.model, "input_size": s, "batch": n, "precision": "fp32", "results": rows,
        "profile": profile,
    }
    write_results(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
