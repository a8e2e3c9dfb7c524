"""Worker for tests/test_host_syncs.py: count host-device synchronisations per optimizer step of the real Trainer.

    python tests/host_sync_check.py --data-root DIR --run-dir DIR --gas 2 --out result.json

Two CPU ranks (gloo) each build the ``Trainer`` exactly as trainer/main.py does (configs/tiny.yaml, ZeRO-2, fp32),
and train 8 steps with tests/host_syncs.py's counter active. Calls are bucketed by the optimizer step they belong
to (a step's own micro-steps plus the loop's work after it until the next step starts). Rank 0 writes, per step,
the trainer's own count (and the NaN agreement's share of it), DeepSpeed's count and every call site.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, LOG_EVERY, MICRO, WORLD = 8, 4, 2, 2
NAN_GUARD = os.path.join("trainer", "monitor", "nan_guard.py")


def _trainer(data_root: str, run_dir: str, gas: int):
    from trainer.config.ds_json import fill_ds_config, load_ds_config
    from trainer.config.schema import load_config
    from trainer.config.validate import validate_run
    from trainer.loop.trainer import Trainer

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), [
        f"data.root={data_root}", f"run.dir={run_dir}", f"train.max_steps={STEPS}", f"log.every={LOG_EVERY}",
        "checkpoint.every=1000", f"train.micro_batch={MICRO}", f"train.global_batch={MICRO * WORLD * gas}",
        "log.stall_minutes=0"])
    ds_raw = load_ds_config("zero2.json")
    stages, shard_sets, topo = validate_run(cfg, ds_raw, WORLD)
    ds = fill_ds_config(ds_raw, cfg, global_batch=stages[0].global_batch, micro_batch=stages[0].micro_batch,
                        data_parallel=topo.data, on_cuda=False)
    return Trainer(cfg, ds, stages, shard_sets, topo, torch.device("cpu"))


def _rank_main(rank: int, port: int, data_root: str, run_dir: str, gas: int, out: str) -> None:
    import torch.distributed as dist

    from tests.host_syncs import HostSyncCounter
    from trainer.engine.distributed import init_local_gloo_rank

    torch.set_num_threads(1)
    init_local_gloo_rank(rank, WORLD, port)
    tr = _trainer(data_root, run_dir, gas)
    tr.setup()
    counter = HostSyncCounter()
    step_fn = tr._train_step

    builds = {}

    def counted_step(*args, **kwargs):
        counter.bucket = tr.state.step + 1  # this step's calls, and the loop's after it, count for it
        out = step_fn(*args, **kwargs)
        builds[tr.state.step] = tr.objective.diffusion.table_builds
        return out

    tr._train_step = counted_step
    with counter:
        code = tr.train()
    if tr.lease is not None:
        tr.lease.release()
    log_steps = [s for s in range(1, STEPS + 1) if s % LOG_EVERY == 0 or s == STEPS]
    own = [r for r in counter.records if r[1] == "trainer"]
    result = {
        "rank": rank, "code": code, "gas": gas, "log_steps": log_steps,
        "trainer": {s: sum(1 for r in own if r[0] == s) for s in range(1, STEPS + 1)},
        "nan_guard": {s: sum(1 for r in own if r[0] == s and r[3].startswith(NAN_GUARD)) for s in range(1, STEPS + 1)},
        "deepspeed": {s: n for s, n in counter.per_bucket("deepspeed").items()},
        "host_reads": {s: n for s, n in counter.per_bucket("host").items()},
        "trainer_sites": {s: dict(counter.sites("trainer", [s])) for s in range(1, STEPS + 1)},
        "deepspeed_sites": {s: dict(counter.sites("deepspeed", [s])) for s in range(1, STEPS + 1)},
        "other_sites": dict(counter.sites("other", range(1, STEPS + 1))),
        "table_builds": builds, "tables_held": len(tr.objective.diffusion._device_tables),
    }
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(everyone, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--gas", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    from trainer.engine.distributed import free_port

    mp.spawn(_rank_main, args=(free_port(), args.data_root, args.run_dir, args.gas, args.out), nprocs=WORLD,
             join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
