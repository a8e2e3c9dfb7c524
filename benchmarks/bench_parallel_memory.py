"""Per-rank parameter + optimizer-state bytes of a DiT under each parallel layout (CPU ranks, gloo, fp32).

    python benchmarks/bench_parallel_memory.py            # DiT-B/2 dense + DiT-S/2 MoE, writes
                                                          # benchmarks/results/parallel_memory.json

Each layout runs as a real ``deepspeed --num_gpus N`` job of this script (``--worker``): the full model is
built with the seed on every rank, trainer/engine/parallelize.py's ``build_engine`` applies the layout (ZeRO-1,
AdamW), one optimizer step runs on a synthetic batch (so Adam's moments exist), and each rank counts
the bytes it holds (benchmarks/engine_memory.py ``state_bytes``: module parameters + unaliased fp32 master partitions
+ optimizer moments). The largest rank is compared with the single process; for MoE the expert
parameters per rank are compared between EP=1 and EP=2 on 2 ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LAYOUTS = {  # name -> (ranks, model, tensor, pipeline, expert, moe experts)
    "single": (1, "DiT-B/2", 1, 1, 1, 0),
    "tp2": (2, "DiT-B/2", 2, 1, 1, 0),
    "pp2": (2, "DiT-B/2", 1, 2, 1, 0),
    "moe_ep1": (2, "DiT-S/2", 1, 1, 1, 8),
    "moe_ep2": (2, "DiT-S/2", 1, 1, 2, 8),
}


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from trainer.config.schema import load_config
    from trainer.engine.distributed import init_distributed
    from trainer.loop.trainer import param_groups
    from trainer.config.model import architecture
    from trainer.engine.objective import build_objective_from_config
    from engine_memory import state_bytes
    from trainer.engine.parallelize import build_engine
    from trainer.loop.seeding import seed_everything
    from trainer.config.topology import Topology

    n, name, tp, pp, ep, experts = LAYOUTS[args.layout]
    device = init_distributed()
    over = [f"model.name={name}", f"model.moe.num_experts={experts}", "model.moe.every=2"]
    cfg = load_config(None, over)
    arch = architecture(cfg, in_channels=4, input_size=32, num_classes=1000)
    topo = Topology(dist.get_world_size(), tp, pp, ep).validate(zero_stage=1, num_heads=arch.num_heads,
                                                              hidden_size=arch.hidden_size, depth=arch.depth,
                                                              num_experts=experts)
    seed_everything(0)
    model = arch.build()
    objective = build_objective_from_config(cfg, arch.learn_sigma)
    ds = {"train_batch_size": topo.data, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    par = build_engine(model, arch=arch, topo=topo, ds=ds, objective=objective,
                       param_groups=lambda m: param_groups(m, 0.0), lr_scheduler=None)
    del model
    g = torch.Generator().manual_seed(topo.coords(dist.get_rank()).data)
    x = torch.randn(1, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (1,), generator=g)
    y = torch.randint(0, 1000, (1,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    t0 = time.perf_counter()
    if par.pipeline:
        drop = torch.zeros(1, dtype=torch.long)
        par.engine.train_batch(iter([((*objective.model_inputs(x, t, noise), y, drop), (x, noise, t))]))
    else:
        out = objective.training_losses(par.engine, x, t, model_kwargs={"y": y}, noise=noise)
        loss = out["loss"].mean()
        if experts:
            loss = loss + par.engine.module.moe_aux_loss()
        par.engine.backward(loss)
        par.engine.step()
    step_s = time.perf_counter() - t0
    mine = state_bytes(par.engine)
    mine["expert_params"] = sum(p.numel() for p in par.engine.module.parameters() if getattr(p, "allreduce", True) is False)
    mine["params"] = sum(p.numel() for p in par.engine.module.parameters())
    mine["step_s"] = step_s
    mine["rank"] = dist.get_rank()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"layout": args.layout, "model": name, "ranks": parts, "topology": topo.describe(),
                       "device": str(device)}, f, indent=1)


def launch(layout: str, out: str) -> dict:
    from trainer.engine.distributed import free_port

    n = LAYOUTS[layout][0]
    cmd = ["deepspeed", "--num_gpus", str(n), "--master_port", str(free_port()), os.path.abspath(__file__),
           "--worker", "--layout", layout, "--out", out]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{layout} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    with open(out) as f:
        return json.load(f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--layout", choices=sorted(LAYOUTS))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "parallel_memory.json"))
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in LAYOUTS:
            results[layout] = launch(layout, os.path.join(tmp, f"{layout}.json"))
            top = max(results[layout]["ranks"], key=lambda r: r["total_bytes"])
            print(f"{layout:8s} {results[layout]['model']:8s} max rank: params {top['param_bytes'] / 2**20:8.1f} MiB "
                  f"+ optimizer {top['optim_bytes'] / 2**20:8.1f} MiB = {top['total_bytes'] / 2**20:8.1f} MiB; "
                  f"expert params {top['expert_params']:,}", flush=True)
    single = results["single"]["ranks"][0]["total_bytes"]
    summary = {}
    for layout in ("tp2", "pp2"):
        worst = max(r["total_bytes"] for r in results[layout]["ranks"])
        summary[f"{layout}_max_rank_over_single"] = worst / single
    e1 = max(r["expert_params"] for r in results["moe_ep1"]["ranks"])
    e2 = max(r["expert_params"] for r in results["moe_ep2"]["ranks"])
    summary["moe_expert_params_per_rank_ep1"] = e1
    summary["moe_expert_params_per_rank_ep2"] = e2
    summary["moe_ep2_over_ep1"] = e2 / e1
    summary["pass"] = (summary["tp2_max_rank_over_single"] <= 0.55 and summary["pp2_max_rank_over_single"] <= 0.55
                       and abs(summary["moe_ep2_over_ep1"] - 0.5) < 1e-9)
    print(json.dumps(summary, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/bench_parallel_memory.py", "zero_stage": 1, "precision": "fp32",
                   "summary": summary, "layouts": results}, f, indent=1)
    print(f"wrote {args.out}")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
