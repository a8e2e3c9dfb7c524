"""Worker for tests/test_zero_master.py: ZeRO engines with and without the fp32 master aliasing, side by side.

    python tests/zero_master_check.py --world 2 --ds-config zero2.json --out result.json

Each rank builds, from the same seeded tiny DiT, one engine the trainer's way (``initialize_engine``: master
aliased) and one as DeepSpeed ships it (``deepspeed.initialize``), trains both 3 steps on the same rank-specific
batches, and records losses, final weights and where each master partition lives. The aliased engine is also
checkpointed after step 2 and a fresh aliased engine resumed from it runs step 3. Rank 0 writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
MICRO = 2
STEPS = 3


def _engine(ds_name: str, world: int, aliased: bool):
    import deepspeed

    from models.dit import DiT
    from trainer.config.schema import load_config
    from trainer.config.ds_json import fill_ds_config, load_ds_config
    from trainer.engine.optimizer import optimizer_config, param_groups
    from trainer.engine.parallelize import initialize_engine

    cfg = load_config(None, ["train.precision=fp32", f"train.micro_batch={MICRO}",
                             f"train.global_batch={MICRO * world}", "train.grad_clip=1.0", "train.weight_decay=0.01"])
    ds = fill_ds_config(load_ds_config(ds_name), cfg, global_batch=MICRO * world, micro_batch=MICRO,
                        data_parallel=world, on_cuda=False)
    ds["optimizer"] = optimizer_config(cfg)
    if "offload_optimizer" in ds["zero_optimization"]:
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the host partitions (no compiled CPU Adam)
    torch.manual_seed(0)
    model = DiT(**MODEL)
    init = initialize_engine if aliased else deepspeed.initialize
    engine, *_ = init(model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=ds)
    return engine


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(MICRO, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (MICRO,), generator=g)
    y = torch.randint(0, 10, (MICRO,), generator=g)
    target = torch.randn(MICRO, 8, 8, 8, generator=g)
    return x, t, y, target


def _train(engine, rank: int, steps) -> list[float]:
    losses = []
    for step in steps:
        x, t, y, target = _batch(rank, step)
        torch.manual_seed(step)  # the model's label dropout draws from the global generator
        loss = torch.nn.functional.mse_loss(engine(x, t, y), target)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _weights(engine) -> list[list[float]]:
    """Full weights on every rank (ZeRO-3 holds only partitions: gather them for the read)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().flatten().tolist() for p in params]


def _master_layout(engine) -> list[dict]:
    import torch.distributed as dist

    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return [{"aliased": m.data_ptr() == own.data_ptr(), "numel": m.numel()}
                for m, own in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat)]
    if not hasattr(opt, "single_partition_of_fp32_groups"):
        return []
    out = []
    for i, master in enumerate(opt.single_partition_of_fp32_groups):
        own = opt.parallel_partitioned_bit16_groups[i][dist.get_rank(group=opt.real_dp_process_group[i])]
        out.append({"aliased": master.data_ptr() == own.data_ptr(), "numel": master.numel()})
    return out


def _rank_main(rank: int, world: int, port: int, ds_name: str, out: str, ckpt_dir: str) -> None:
    from trainer.engine.distributed import init_local_gloo_rank

    torch.set_num_threads(1)
    init_local_gloo_rank(rank, world, port)

    shipped = _engine(ds_name, world, aliased=False)
    shipped_losses = _train(shipped, rank, range(STEPS))
    result = {"shipped_losses": shipped_losses, "shipped_weights": _weights(shipped),
              "shipped_layout": _master_layout(shipped)}
    del shipped

    aliased = _engine(ds_name, world, aliased=True)
    result["aliased_layout"] = _master_layout(aliased)
    losses = _train(aliased, rank, range(STEPS - 1))
    aliased.save_checkpoint(ckpt_dir, tag="step2")
    losses += _train(aliased, rank, [STEPS - 1])
    result.update(aliased_losses=losses, aliased_weights=_weights(aliased))
    del aliased

    resumed = _engine(ds_name, world, aliased=True)
    resumed.load_checkpoint(ckpt_dir, tag="step2")
    result["resumed_layout"] = _master_layout(resumed)
    result["resumed_losses"] = _train(resumed, rank, [STEPS - 1])
    result["resumed_weights"] = _weights(resumed)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main() -> int:
    sys.path.insert(0, REPO)
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--ds-config", default="zero2.json")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from trainer.engine.distributed import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as ckpt_dir:
        mp.start_processes(_rank_main, args=(args.world, port, args.ds_config, args.out, ckpt_dir), nprocs=args.world,
                           start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
