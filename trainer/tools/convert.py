"""``python -m trainer.convert RUN_OR_CHECKPOINT [--universal] [--archive OUT.pt]``: layout conversion by hand.

``--universal`` makes (or verifies) the layout-independent copy a resume on another layout needs (trainer/state/convert.py), e.g. ahead of a large relaunch, so the job does not spend its first minutes on it.
``--archive`` writes one consolidated fp32 file for archiving or for other tools: weights, AdamW moments and step
per parameter under official DiT names, the EMA, the model's DiTArgs and the trainer state, loadable with
``torch.load(path, weights_only=True)``. Any layout: data-parallel checkpoints convert through DeepSpeed's converter,
tensor/pipeline/expert-parallel and MoE ones through trainer/state/reshard.py (in this one process).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def write_archive(checkpoint: str, out_path: str) -> dict:
    import torch

    from trainer.state.checkpoint import read_trainer_state
    from trainer.state.consolidate import checkpoint_args, consolidated_ema
    from trainer.state.convert import ensure_universal, universal_state

    universal, _ = ensure_universal(checkpoint)
    state = universal_state(universal)
    ema, _ = consolidated_ema(checkpoint)
    arch = checkpoint_args(checkpoint)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in arch.build().named_parameters() if p.requires_grad}
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise RuntimeError(f"{universal} lacks {len(missing)} parameters, e.g. {missing[:3]}")
    archive = {
        "format": "dit-deepspeed consolidated fp32 checkpoint v1",
        "arch": arch.to_dict(),
        "trainer_state": read_trainer_state(checkpoint).to_json(),
        "weights": {n: state[n]["fp32"].float().reshape(s).clone() for n, s in shapes.items()},
        "exp_avg": {n: state[n]["exp_avg"].float().reshape(s).clone() for n, s in shapes.items()},
        "exp_avg_sq": {n: state[n]["exp_avg_sq"].float().reshape(s).clone() for n, s in shapes.items()},
        "adam_step": int(next(iter(state.values()))["step"]),
        "ema": {n: t.float().clone() for n, t in ema.items()},
    }
    tmp = out_path + ".tmp"
    torch.save(archive, tmp)
    os.replace(tmp, out_path)
    return archive


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run directory (newest verified checkpoint), checkpoints/ dir or one checkpoint")
    p.add_argument("--universal", action="store_true", help="make the layout-independent (universal) copy")
    p.add_argument("--archive", metavar="OUT", help="write a consolidated fp32 file (weights, moments, EMA, state)")
    args = p.parse_args(argv)
    if not args.universal and not args.archive:
        p.error("nothing to do: give --universal and/or --archive OUT")
    from trainer.state.consolidate import resolve_checkpoint
    from trainer.state.convert import ensure_universal

    try:
        ck = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.universal:
        t0 = time.perf_counter()
        out, seconds = ensure_universal(ck)
        print(f"{ck} -> {out}: " + (f"converted in {seconds:.1f} s" if seconds else
                                     f"existing conversion verified in {time.perf_counter() - t0:.1f} s"))
    if args.archive:
        archive = write_archive(ck, args.archive)
        print(f"{ck} -> {args.archive}: {len(archive['weights'])} parameters, step {archive['trainer_state']['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
