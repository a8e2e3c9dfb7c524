"""Worker for tests/test_elastic_resume.py: resume a run directory the trainer's way, then dump what was loaded.

    deepspeed --num_gpus N tests/elastic_check.py --config configs/tiny.yaml --ds_config zero3.json \
        --out state.pt key=value ...

Every rank builds the Trainer and runs its ``setup`` (lease, engine, resume through trainer/loop/restore.py: the
path a real launch takes), then gathers the full fp32 weights and AdamW moments through DeepSpeed's
``safe_get_full_*`` under official names, tensor slices merged (trainer/state/elastic.py ``gathered_state``), every
rank's flat partitions' AdamW steps, the full EMA, the
LR schedule position and the engine's counters; rank 0 writes them with ``torch.save`` (tensors and plain types only).
No training step is taken.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--ds_config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import torch
    import torch.distributed as dist

    from trainer.config.ds_json import fill_ds_config, load_ds_config
    from trainer.config.schema import load_config
    from trainer.config.validate import validate_run
    from trainer.engine.distributed import init_distributed, prepare_env, world_size_from_env
    from trainer.loop.trainer import Trainer
    from trainer.state.elastic import gathered_state

    prepare_env()
    cfg = load_config(args.config, args.overrides)
    stages, shard_sets, topo = validate_run(cfg, load_ds_config(args.ds_config), world_size_from_env())
    ds = fill_ds_config(load_ds_config(args.ds_config), cfg, global_batch=stages[0].global_batch,
                        micro_batch=stages[0].micro_batch, data_parallel=topo.data, on_cuda=False)
    device = init_distributed()
    trainer = Trainer(cfg, ds, stages, shard_sets, topo, device)
    trainer.setup()
    par = trainer.par
    state = gathered_state(trainer.engine, par.name_map, par.split, par.layout())
    ema = trainer.ema.full_tensors(dst=0)
    engine = trainer.engine
    if dist.get_rank() == 0:
        torch.save({"params": state["params"], "steps": state["steps"], "ema": ema, "step": trainer.state.step,
                    "lr_last_step": engine.lr_scheduler.last_step,
                    "lr": [g["lr"] for g in engine.optimizer.optimizer.param_groups],
                    "global_steps": engine.global_steps, "global_samples": engine.global_samples,
                    "skipped_steps": engine.skipped_steps}, args.out)
    dist.barrier()
    if trainer.lease is not None:
        trainer.lease.release()
    sys.stdout.flush()
    os._exit(0)  # the trainer's watchdog threads are not joined: nothing else is left to do


if __name__ == "__main__":
    sys.exit(main())
