"""Worker for tests/test_fp16.py: fp16 autocast under ZeRO on one CPU rank, the trainer's engine vs DeepSpeed's.

    python tests/fp16_check.py --ds-config zero2.json --out result.json

Builds the same seeded tiny DiT three times from the same JSON filled by the trainer: fp32, fp16 the trainer's way
(``initialize_engine``: trainer/engine/loss_scale.py) and fp16 as DeepSpeed ships it (``deepspeed.initialize``:
its GradScaler inside ZeRO). Each trains the same batches with gradient clipping active; the fp16 engines get an
infinite loss at steps 3 and 4 (an overflow). The trainer's engine is checkpointed after step 4 and reloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
MICRO, STEPS, CLIP, OVERFLOW_STEPS = 4, 6, 0.3, (3, 4)


def _engine(ds_name: str, precision: str, ours: bool):
    import deepspeed

    from models.dit import DiT
    from trainer.config.ds_json import fill_ds_config, load_ds_config
    from trainer.config.schema import load_config
    from trainer.engine.optimizer import optimizer_config, param_groups
    from trainer.engine.parallelize import initialize_engine

    cfg = load_config(None, [f"train.precision={precision}", f"train.micro_batch={MICRO}",
                             f"train.global_batch={MICRO}", f"train.grad_clip={CLIP}", "train.lr=1e-3"])
    ds = fill_ds_config(load_ds_config(ds_name), cfg, global_batch=MICRO, micro_batch=MICRO, data_parallel=1,
                        on_cuda=False)
    ds["optimizer"] = optimizer_config(cfg)
    torch.manual_seed(0)
    model = DiT(**MODEL)
    init = initialize_engine if ours else deepspeed.initialize
    engine, *_ = init(model=model, model_parameters=param_groups(model, 0.0), config=ds)
    return engine


def _weights(engine) -> torch.Tensor:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return torch.cat([p.detach().float().flatten().clone() for p in params])


def _train(engine, steps, overflow=()) -> list[dict]:
    records = []
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, t = torch.randn(MICRO, 4, 8, 8, generator=g), torch.randint(0, 1000, (MICRO,), generator=g)
        y, target = torch.randint(0, 10, (MICRO,), generator=g), torch.randn(MICRO, 8, 8, 8, generator=g)
        before = _weights(engine)
        loss = torch.nn.functional.mse_loss(engine(x, t, y).float(), target)
        if step in overflow:
            loss = loss * float("inf")
        engine.backward(loss)
        engine.step()
        norm = engine.get_global_grad_norm()
        scaling = getattr(engine, "dit_loss_scaling", None)
        records.append({"step": step, "loss": float(loss), "grad_norm": float(norm) if norm is not None else None,
                        "update": float((_weights(engine) - before).norm()), "applied": engine.was_step_applied(),
                        **(scaling.stats() if scaling is not None else {})})
    return records


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ds-config", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    from trainer.engine.distributed import free_port, init_local_gloo_rank

    torch.set_num_threads(1)
    init_local_gloo_rank(0, 1, free_port())
    out = {"fp32": _train(_engine(args.ds_config, "fp32", True), range(STEPS))}
    # DeepSpeed as shipped, before the trainer's engine: its torch-autocast set-up is process-global
    out["shipped"] = _train(_engine(args.ds_config, "fp16", False), range(STEPS), OVERFLOW_STEPS)
    ours = _engine(args.ds_config, "fp16", True)
    out["fp16"] = _train(ours, range(STEPS - 1), OVERFLOW_STEPS)
    with tempfile.TemporaryDirectory() as ckpt:
        ours.save_checkpoint(ckpt, tag="t")
        saved = ours.dit_loss_scaling.stats()
        out["fp16"] += _train(ours, [STEPS - 1])
        resumed = _engine(args.ds_config, "fp16", True)
        fresh = resumed.dit_loss_scaling.stats()
        resumed.load_checkpoint(ckpt, tag="t")
        out["resume"] = {"saved": saved, "fresh": fresh, "loaded": resumed.dit_loss_scaling.stats(),
                         "steps": _train(resumed, [STEPS - 1])}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
