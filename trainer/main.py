"""Entry point: ``deepspeed trainer/main.py --ds_config zero2.json --config configs/<run>.yaml [key=value ...]``.

Also runs under ``torchrun``, ``srun`` (one task per GPU) and as one plain ``python`` process.
Everything is validated before the process group starts, so a bad run fails in seconds with the
offending key or file named, on every rank, with a non-zero exit.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.rundir import EXIT_CONFIG_ERROR, EXIT_LAUNCH_ERROR  # noqa: E402  (torch-free)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a DiT on latent shards with DeepSpeed.")
    p.add_argument("--config", default=None, help="run config YAML (configs/<run>.yaml)")
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default="zero2.json",
                   help="DeepSpeed JSON; bare names resolve against configs/ (default zero2.json)")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--validate_only", action="store_true", help="check config, shards and layout, then exit")
    p.add_argument("--takeover", action="store_true",
                   help="take run.dir over from the run holding its lease even if that run still heartbeats "
                        "(it stops writing at its next heartbeat)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from trainer.config.schema import ConfigError, load_config
    from trainer.engine.distributed import prepare_env, world_size_from_env
    from trainer.config.ds_json import fill_ds_config, load_ds_config
    from trainer.config.topology import LayoutError
    from trainer.config.validate import validate_run

    launched = prepare_env()
    try:
        cfg = load_config(args.config, args.overrides)
        ds_raw = load_ds_config(args.ds_config)
        world = world_size_from_env()
        stages, shard_sets, topo = validate_run(cfg, ds_raw, world)
        import torch

        on_cuda = torch.cuda.is_available()
        first = stages[0]
        ds = fill_ds_config(ds_raw, cfg, global_batch=first.global_batch, micro_batch=first.micro_batch,
                            data_parallel=topo.data, on_cuda=on_cuda)
        from trainer.config.resume import check_resume_layout

        check_resume_layout(cfg, stages, topo, ds)  # a layout the newest checkpoint cannot load: refused now
    except (ConfigError, LayoutError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    if args.validate_only:
        print(f"ok: {len(stages)} stage(s), world {world}, data-parallel {topo.data}, ZeRO stage "
              f"{ds.get('zero_optimization', {}).get('stage', 0)}")
        return 0
    if not launched and world > 1:
        print(f"error: WORLD_SIZE={world} but no RANK: start {world} ranks with deepspeed --num_gpus, torchrun or "
              f"srun (WORLD_SIZE without a launcher is only for --validate_only)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from trainer.engine.device import DeviceMappingError, configure_matmul_precision
    from trainer.engine.distributed import init_distributed
    from trainer.loop.trainer import run_training

    try:
        device = init_distributed(hang_seconds=cfg.run.hang_timeout_minutes * 60)
    except DeviceMappingError as exc:  # ranks cannot be mapped onto the GPUs: say why, on every rank
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_LAUNCH_ERROR
    math = configure_matmul_precision(cfg.train.precision, cfg.train.tf32, device)
    if os.environ.get("RANK", "0") == "0":
        print(f"[trainer] device {device}, matmuls in {math}", flush=True)
    return run_training(cfg, ds, stages, shard_sets, topo, device, takeover=args.takeover)


if __name__ == "__main__":
    sys.exit(main())
