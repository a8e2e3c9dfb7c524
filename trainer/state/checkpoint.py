"""Atomic checkpoints: write under a temporary tag, verify, publish by rename, move `latest` last.

Layout under ``run.dir/checkpoints/``::

    step00001000/            one published checkpoint (DeepSpeed's files + ours)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...   (DeepSpeed)
        ema.pt | ema_rank00001.pt ...   EMA (full, or per-rank shards under ZeRO-3)
        trainer_state.json              step, stage, data position, model config
        rng_rank00000.pt ...            RNG states per rank
        COMPLETE.json                   file list with byte sizes and xxh3-128 checksums, written last
    latest                              text file naming the newest published tag, replaced atomically
    .tmp-step00002000/                  a save in progress: never picked up

A half-written checkpoint is never picked up: it either still has its temporary name, or lacks
COMPLETE.json, or has a file whose size differs from COMPLETE.json (truncated after the fact). A published one
whose bytes changed later (bit rot, an overwrite of the same length) fails its xxh3-128 checksum
(trainer/state/integrity.py): the checksums are computed from the files as written, read back in parallel over
the ranks, before the rename and before ``latest`` moves, and every file is re-hashed at resume.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from models.args import DiTArgs
from trainer.state import integrity
from trainer.rundir import DIVERGED, LATEST, atomic_write_text
from trainer.engine.distributed import barrier, rank as current_rank

TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def _warn(msg: str) -> None:
    print(f"[checkpoint] WARNING: {msg}", file=sys.stderr, flush=True)


def verify_checkpoint(path: str, deep: bool = False) -> Optional[str]:
    """None when ``path`` is a complete checkpoint, else the reason it is not.

    Shallow: every recorded file present with its recorded size. ``deep``: every file re-hashed against its
    checksum too (one read of the checkpoint, in this process)."""
    problem = integrity.check_sizes(path)
    if problem is None and deep:
        problems = integrity.check_hashes(path)
        problem = problems[0] if problems else None
    return problem


def _hash_share(path: str, sizes: dict, deep_check: bool) -> dict:
    """Collective: this rank's share of ``path``'s files hashed (``deep_check``: compared with COMPLETE.json);
    rank 0 gets every rank's result merged: ``{"digests": {rel: hex}, "problems": [...]}``."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = integrity.assign(sizes, world)[current_rank()]
    if deep_check:
        result = {"digests": {}, "problems": integrity.check_hashes(path, mine)}
    else:
        result = {"digests": {rel: integrity.file_digest(os.path.join(path, rel)) for rel in mine}, "problems": []}
    if world == 1:
        return result
    parts = [None] * world if current_rank() == 0 else None
    dist.gather_object(result, parts, dst=0)
    if current_rank() != 0:
        return {}
    return {"digests": {k: v for p in parts for k, v in p["digests"].items()},
            "problems": [x for p in parts for x in p["problems"]]}


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """Published checkpoints as (step, path), newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if m and os.path.isdir(os.path.join(ckpt_dir, name)):
            found.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return sorted(found, reverse=True)


def find_resumable(ckpt_dir: str, deep: bool = True) -> Optional[str]:
    """The newest complete checkpoint whose files match their checksums (one process reads them all; the trainer
    uses the collective ``find_verified``); incomplete or corrupt ones are skipped with a warning."""
    for _, path in list_checkpoints(ckpt_dir):
        problem = verify_checkpoint(path, deep=deep)
        if problem is None:
            return path
        _warn(f"skipping checkpoint: {problem}")
    return None


def find_verified(ckpt_dir: str, before_step: Optional[int] = None) -> tuple[Optional[str], list[dict]]:
    """Collective: the newest checkpoint that is complete and whose every file matches its checksum, hashed in
    parallel (each rank reads about 1/world of it). Returns (path or None, [{"checkpoint", "problem"}] skipped).
    ``before_step``: only checkpoints of earlier steps (a rollback's target: written before a divergence began)."""
    skipped = []
    candidates = None
    if current_rank() == 0:
        candidates = [p for s, p in list_checkpoints(ckpt_dir) if before_step is None or s < before_step]
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [candidates]
        dist.broadcast_object_list(box, src=0)
        candidates = box[0]
    for path in candidates:
        problem = integrity.check_sizes(path) if current_rank() == 0 else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem is None:
            sizes = {rel: meta["size"] for rel, meta in integrity.read_manifest(path)[0].items()}
            found = _hash_share(path, sizes, deep_check=True).get("problems", [])
            problem = found[0] if found else None
            if dist.is_initialized() and dist.get_world_size() > 1:
                box = [problem]
                dist.broadcast_object_list(box, src=0)
                problem = box[0]
        if problem is None:
            return path, skipped
        if current_rank() == 0:
            _warn(f"skipping checkpoint {os.path.basename(path)}: {problem}")
        skipped.append({"checkpoint": path, "problem": problem})
    return None, skipped


@dataclass
class TrainerState:
    step: int = 0
    stage: int = 0
    samples_seen: int = 0
    data_batches: int = 0  # micro-batches consumed per data-parallel rank in the current stage (resampled stream)
    data_position: int = 0  # elastic stream: global sample position of the next step's first sample in this stage
    layout: dict = field(default_factory=dict)  # the parallel layout and batch this checkpoint was written under
    model_config: dict = field(default_factory=dict)
    wandb_run_id: str = ""
    nan_skipped: int = 0  # optimizer steps not applied (non-finite loss or gradients) on the way to these weights
    rollbacks: int = 0  # automatic rollbacks so far (trainer/loop/rollback.py)
    data_skips: list = field(default_factory=list)  # data windows skipped by rollbacks: {stage, start, end, ...}
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> "TrainerState":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class ModelConfigMismatch(ValueError):
    pass


def check_model_config(saved: dict, current: DiTArgs, ignore=("input_size",)) -> None:
    """Refuse a checkpoint of another architecture (the token grid may differ: progressive stages)."""
    if "pe_base_size" not in saved and current.pe_base_size is not None:
        # written before the record held it (checkpoints then trained with pe_interpolation scaled the same way)
        saved = dict(saved, pe_base_size=current.pe_base_size)
    try:
        saved_args = DiTArgs.from_dict(saved)
    except (TypeError, ValueError) as exc:
        raise ModelConfigMismatch(f"checkpoint's model_config is not a DiT configuration this trainer knows ({exc}); "
                                  "refusing to resume") from None
    diffs = [f"checkpoint vs run {d}" for d in saved_args.differences(current, ignore)]
    if diffs:
        raise ModelConfigMismatch(
            "checkpoint was trained with a different model configuration; refusing to resume (" + "; ".join(diffs) +
            "). Start a new run.dir, or use checkpoint.init_from to initialise weights only.")


def save_checkpoint(engine, ema, state: TrainerState, ckpt_dir: str, keep_last: int, rng: dict,
                    ema_writer_ranks: Optional[set] = None, extra_save=None) -> str:
    """Collective: every rank calls it. Returns the published path.

    ``extra_save(tmp_path)``, when given, runs on every rank before the checkpoint is sealed (model-parallel
    layouts write their weight slices under official names there, for export: trainer/engine/parallelize.py).
    """
    tag = tag_for_step(state.step)
    tmp_tag = ".tmp-" + tag
    tmp_path = os.path.join(ckpt_dir, tmp_tag)
    final_path = os.path.join(ckpt_dir, tag)
    rank = current_rank()
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp_path, ignore_errors=True)
    barrier()
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state={"trainer_step": state.step}, save_latest=False)
    ema_state = ema.local_state()
    if ema.sharded:
        torch.save(ema_state, os.path.join(tmp_path, f"ema_rank{rank:05d}.pt"))
    elif ema_writer_ranks is None and rank == 0 or ema_writer_ranks is not None and rank in ema_writer_ranks:
        torch.save(ema_state, os.path.join(tmp_path, "ema.pt" if ema_writer_ranks is None else f"ema_rank{rank:05d}.pt"))
    torch.save(rng, os.path.join(tmp_path, f"rng_rank{rank:05d}.pt"))
    if extra_save is not None:
        extra_save(tmp_path)
    barrier()
    sizes = None
    if rank == 0:
        atomic_write_text(os.path.join(tmp_path, "trainer_state.json"), json.dumps(state.to_json(), indent=2))
        sizes = integrity.list_files(tmp_path)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [sizes]
        dist.broadcast_object_list(box, src=0)
        sizes = box[0]
    hashed = _hash_share(tmp_path, sizes, deep_check=False)  # every byte read back once, split over the ranks
    if rank == 0:
        integrity.write_manifest(tmp_path, sizes, hashed["digests"])
        problem = integrity.check_sizes(tmp_path)  # nothing changed while it was being hashed
        if problem:
            raise RuntimeError(f"checkpoint {tmp_path} failed verification before publishing: {problem}")
        if os.path.exists(final_path):  # a re-save of the same step (e.g. preemption right after a save)
            shutil.rmtree(final_path)
        os.rename(tmp_path, final_path)
        atomic_write_text(os.path.join(ckpt_dir, LATEST), tag + "\n")
        for _, old in list_checkpoints(ckpt_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(os.path.join(ckpt_dir, "universal-" + os.path.basename(old)), ignore_errors=True)
    barrier()
    return final_path


def read_trainer_state(path: str) -> TrainerState:
    with open(os.path.join(path, "trainer_state.json")) as f:
        return TrainerState.from_json(json.load(f))


def load_ema_state(path: str, rank: int, sharded: bool) -> dict:
    name = f"ema_rank{rank:05d}.pt" if sharded or not os.path.exists(os.path.join(path, "ema.pt")) else "ema.pt"
    return torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)


def load_rng_state(path: str, rank: int) -> Optional[dict]:
    f = os.path.join(path, f"rng_rank{rank:05d}.pt")
    if not os.path.exists(f):
        return None
    return torch.load(f, map_location="cpu", weights_only=True)


def set_aside_checkpoints(ckpt_dir: str, from_step: int, keep: int) -> list[str]:
    """Rank 0, after a divergence: move published checkpoints of step >= ``from_step`` (written after it began) to
    ``checkpoints/diverged/`` where resume never looks, point ``latest`` at the newest one left, and keep only the
    ``keep`` newest set-aside ones (they hold diverged weights, kept for inspection). Returns the moved tags."""
    aside = os.path.join(ckpt_dir, DIVERGED)
    moved = []
    for step, path in sorted(list_checkpoints(ckpt_dir)):
        if step < from_step:
            continue
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, os.path.basename(path))
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(path, target)
        moved.append(os.path.basename(path))
    left = list_checkpoints(ckpt_dir)
    if left:
        atomic_write_text(os.path.join(ckpt_dir, LATEST), tag_for_step(left[0][0]) + "\n")
    elif os.path.exists(os.path.join(ckpt_dir, LATEST)):
        os.unlink(os.path.join(ckpt_dir, LATEST))
    if os.path.isdir(aside):
        old = sorted((n for n in os.listdir(aside) if TAG_RE.match(n)), reverse=True)[max(keep, 0):]
        for name in old:
            shutil.rmtree(os.path.join(aside, name), ignore_errors=True)
    return moved
