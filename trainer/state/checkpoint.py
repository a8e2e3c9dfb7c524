"""Atomic checkpoints: write under a temporary tag, verify, publish by rename, move `latest` last.

Layout under ``run.dir/checkpoints/``::

    step00001000/            one published checkpoint (DeepSpeed's files + ours)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...   (DeepSpeed)
        ema.pt | ema_rank00001.pt ...   EMA (full, or per-rank shards under ZeRO-3)
        trainer_state.json              step, stage, data position, model config
        rng_rank00000.pt ...            RNG states per rank
        COMPLETE.json                   file list with byte sizes, written last before the rename
    latest                              text file naming the newest published tag, replaced atomically
    .tmp-step00002000/                  a save in progress: never picked up

A half-written checkpoint is never picked up: it either still has its temporary name, or lacks
COMPLETE.json, or has a file whose size differs from COMPLETE.json (truncated after the fact).
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

from models.args import DiTArgs
from trainer.rundir import CHECKPOINT_COMPLETE, LATEST, atomic_write_text
from trainer.engine.distributed import barrier, rank as current_rank

TAG_RE = re.compile(r"^step(\d{8})$")
COMPLETE = CHECKPOINT_COMPLETE


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def _warn(msg: str) -> None:
    print(f"[checkpoint] WARNING: {msg}", file=sys.stderr, flush=True)


def _file_sizes(root: str) -> dict:
    sizes = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == COMPLETE:
                continue
            full = os.path.join(dirpath, name)
            sizes[os.path.relpath(full, root)] = os.path.getsize(full)
    return sizes


def verify_checkpoint(path: str) -> Optional[str]:
    """None when ``path`` is a complete checkpoint, else the reason it is not."""
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(marker):
        return f"{path} has no {COMPLETE} (save did not finish)"
    try:
        with open(marker) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"{marker} is unreadable: {exc}"
    for rel, size in expected.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        actual = os.path.getsize(full)
        if actual != size:
            return f"{full} has {actual} bytes, expected {size} (truncated or overwritten)"
    return None


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


def find_resumable(ckpt_dir: str) -> Optional[str]:
    """The newest complete checkpoint; incomplete or corrupt ones are skipped with a warning."""
    for _, path in list_checkpoints(ckpt_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        _warn(f"skipping checkpoint: {problem}")
    return None


@dataclass
class TrainerState:
    step: int = 0
    stage: int = 0
    samples_seen: int = 0
    data_batches: int = 0  # micro-batches consumed per data-parallel rank in the current stage
    model_config: dict = field(default_factory=dict)
    wandb_run_id: str = ""
    nan_skipped: int = 0
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
    if rank == 0:
        atomic_write_text(os.path.join(tmp_path, "trainer_state.json"), json.dumps(state.to_json(), indent=2))
        atomic_write_text(os.path.join(tmp_path, COMPLETE), json.dumps({"files": _file_sizes(tmp_path)}, indent=1))
        if os.path.exists(final_path):  # a re-save of the same step (e.g. preemption right after a save)
            shutil.rmtree(final_path)
        os.rename(tmp_path, final_path)
        atomic_write_text(os.path.join(ckpt_dir, LATEST), tag + "\n")
        for _, old in list_checkpoints(ckpt_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
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
