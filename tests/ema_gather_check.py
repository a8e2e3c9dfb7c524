"""Worker for tests/test_ema_gather.py: the EMA gather of model-parallel layouts on 4 CPU ranks.

    python tests/ema_gather_check.py --out result.json

For each layout (DP2×TP2, then PP2×DP2, in the same 4 processes) each rank builds the trainer's engine for the layout (``build_engine`` on the seeded tiny DiT, ZeRO-1) and its
EMA (``make_ema``), gives the EMA values that differ from the weights (the same on data-parallel replicas, as
training keeps them), and gathers it twice: the way the trainer did before (``gather_object`` of every rank's
whole slice) and with ``ParallelEMA.full_tensors``, counting the bytes ``torch.distributed.recv`` brings rank 0.
Rank 0 writes both results' equality, the bytes and each rank's slice size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"dp2tp2": {"tensor": 2, "pipeline": 1}, "pp2dp2": {"tensor": 1, "pipeline": 2}}
WORLD = 4


def _build(layout: dict):
    from models.objectives import build_objective
    from trainer.config.ds_json import fill_ds_config, load_ds_config
    from trainer.config.model import architecture
    from trainer.config.schema import load_config
    from trainer.config.topology import Topology
    from trainer.engine.optimizer import optimizer_config, param_groups
    from trainer.engine.parallelize import build_engine
    from trainer.state.parallel_ema import make_ema

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), ["model.depth=4", "train.micro_batch=1",
                                                                    "train.global_batch=4"])
    topo = Topology(WORLD, layout["tensor"], layout["pipeline"]).validate(zero_stage=1, num_heads=4, hidden_size=64,
                                                                         depth=4)
    ds = fill_ds_config(load_ds_config("zero1.json"), cfg, global_batch=4, micro_batch=1, data_parallel=topo.data,
                        on_cuda=False)
    ds["optimizer"] = optimizer_config(cfg)
    arch = architecture(cfg, in_channels=4, input_size=8, num_classes=8)
    torch.manual_seed(0)
    model = arch.build()
    par = build_engine(model, arch=arch, topo=topo, ds=ds, objective=build_objective("diffusion"),
                       param_groups=lambda m: param_groups(m, 0.0),
                       lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    ema = make_ema(par, 0.9999)
    with torch.no_grad():  # EMA values != weights, identical on data-parallel replicas (as training keeps them)
        for s in ema.shadow:
            s.mul_(1.5).add_(0.25)
    return ema


def _rank_main(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from trainer.engine.distributed import init_local_gloo_rank

    torch.set_num_threads(1)
    init_local_gloo_rank(rank, WORLD, port)
    results = {name: _gather(rank, layout) for name, layout in LAYOUTS.items()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def _gather(rank: int, layout: dict) -> dict:
    import torch.distributed as dist

    from trainer.state.parallel_ema import merge_states

    ema = _build(layout)
    local = ema.local_state()
    parts = [None] * WORLD if rank == 0 else None
    dist.gather_object(local, parts, dst=0)  # the old way: every rank's whole slice to rank 0
    reference = merge_states(parts) if rank == 0 else None
    received = []
    original_recv = dist.recv

    def counting_recv(tensor, *args, **kwargs):
        result = original_recv(tensor, *args, **kwargs)
        received.append(tensor.numel() * tensor.element_size())
        return result

    dist.recv = counting_recv
    try:
        full = ema.full_tensors()
    finally:
        dist.recv = original_recv
    slice_bytes = sum(t.numel() * t.element_size() for t in local["tensors"].values())
    split_bytes = sum(t.numel() * t.element_size() for n, t in local["tensors"].items() if n in local["split"])
    info = {"rank": rank, "layout": local["layout"], "slice_bytes": slice_bytes, "split_bytes": split_bytes,
            "received_bytes": sum(received), "sent": ema.last_gather.get("sent", 0), "got_tensors": len(full)}
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, info)
    if rank != 0:
        return {}
    same = sorted(full) == sorted(reference) and all(torch.equal(full[k], reference[k]) for k in reference)
    return {"ranks": everyone, "equal_to_gather_object": same, "tensors": len(full),
            "per_sender": {str(k): v for k, v in ema.last_gather["received_bytes"].items()}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    from trainer.engine.distributed import free_port

    mp.spawn(_rank_main, args=(free_port(), args.out), nprocs=WORLD, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
