"""Restore a run from one checkpoint: the path shared by resume (at start) and rollback (after a divergence).

Why one path: a rollback that restored less than a resume does (the EMA, the RNG streams, a checkpoint written
under another data-parallel size) would continue from a state no uninterrupted run ever had, and the
"rollback equals a run started from that checkpoint" guarantee would hold only by accident.
"""
from __future__ import annotations

import os

from trainer.config.resume import layout_record, resume_mode
from trainer.loop.seeding import set_rng_state
from trainer.state import checkpoint as ckpt


def restore_checkpoint(trainer, path: str) -> ckpt.TrainerState:
    """Collective: engine (weights, optimizer, LR schedule), EMA and RNGs of ``trainer`` from checkpoint ``path``;
    returns its trainer state. A checkpoint of another data-parallel size or ZeRO family goes through DeepSpeed's
    universal checkpoint (converted once, on rank 0); a layout the conversion cannot bridge is refused with the reason."""
    saved = ckpt.read_trainer_state(path)
    ckpt.check_model_config(saved.model_config, trainer.arch)
    stage = trainer._stage_for_state(saved)
    trainer._set_stage_shape(stage)
    here = layout_record(trainer.topo, trainer.ds, stage)
    mode, problem = resume_mode(saved.layout or here, here, moe=trainer.arch.moe is not None)
    if mode == "refused":
        raise RuntimeError(f"cannot resume {path} under this layout: {problem}")
    if mode == "universal":
        load_converted(trainer.par, trainer.ema, path, trainer.rank)
    else:
        load_path, _ = trainer.engine.load_checkpoint(trainer.ckpt_dir, tag=os.path.basename(path))
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        trainer.ema.load_local_state(ckpt.load_ema_state(path, trainer.rank, trainer.ema.sharded))
    rng = ckpt.load_rng_state(path, trainer.rank)
    if rng is not None:
        set_rng_state(rng)
    return saved


def load_converted(par, ema, checkpoint: str, rank: int) -> None:
    """Collective: resume ``checkpoint`` under another layout (trainer/state/convert.py, trainer/state/reshard.py).

    A ZeRO-1/2 checkpoint (any layout) is converted by every rank together (trainer/state/reshard.py); a ZeRO-3 one,
    or an older data-parallel one without optimizer maps, by DeepSpeed's converter on rank 0 while the others wait
    (trainer/state/convert.py). Either way the result is
    one folder per parameter under official names, atomically published beside the original. Every rank then loads
    its piece (its partition, tensor slice, pipeline stage or experts) through DeepSpeed's tensor-fragment API
    (trainer/state/elastic.py: the same for ZeRO-1, 2 and 3) and its EMA slice from the consolidated EMA."""
    from trainer.engine.distributed import barrier, world
    from trainer.state.consolidate import consolidated_ema
    from trainer.state.convert import ensure_universal, universal_path
    from trainer.state.elastic import load_universal
    from trainer.state.reshard import ensure_resharded, rank_maps

    if rank_maps(checkpoint):
        out, seconds = ensure_resharded(checkpoint, rank, world())
    elif rank == 0:
        out, seconds = ensure_universal(checkpoint)
    if rank == 0:
        print(f"[trainer] {checkpoint} converted for a new layout in {seconds:.1f} s ({out})"
              if seconds else f"[trainer] using the existing conversion {out}", flush=True)
    barrier()
    load_universal(par.engine, universal_path(checkpoint), par.name_map, par.split, par.coords.tensor, par.topo.tensor)
    tensors, _ = consolidated_ema(checkpoint)
    ema.load_full(tensors)
