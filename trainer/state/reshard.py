"""Re-cut any ZeRO-1/2 checkpoint (data-, tensor-, pipeline-, expert-parallel) into per-parameter folders under
official DiT names, on every rank of the resuming launch at once.

DeepSpeed's converter (``ds_to_universal``) knows neither our fairscale tensor slices, nor the ``PipelineModule``'s
layer-numbered names, nor DeepSpeed-MoE's expert files (DeepSpeed #5716), and runs on one rank. But every ZeRO-1/2
optimizer file carries ``param_slice_mappings`` (per parameter group: local name -> offset and length of its fragment
in this rank's flat fp32/AdamW partition), and every rank of a ZeRO-1/2 checkpoint writes ``optim_map_rank*.json``
(trainer/engine/parallelize.py ``optimizer_map``): its optimizer file, each group's partition index (dense groups are
cut over the data-parallel group, expert groups over the expert-data-parallel group) and its local names with their
official names, shapes and tensor split. With those, the conversion is layout-free:

1. extract (the ranks share the optimizer files, file i on rank i % world): every fragment of every parameter is
   written as ``.fragments/<official>/t<tensor rank>.p<partition>.pt`` (fp32 weight, both moments, AdamW step).
   Pipeline stages and experts own disjoint official names; a parameter replicated over tensor ranks is taken from
   tensor rank 0 only;
2. merge (official name i on rank i % world): a parameter's fragments concatenated in partition order give this
   tensor rank's tensor, reshaped to its local shape; tensor slices merge like the weights and EMA do
   (``merge_tensor_slices``), into ``zero/<official>/{fp32,exp_avg,exp_avg_sq,step}.pt``: the same files
   DeepSpeed's converter writes for a data-parallel run, so trainer/state/elastic.py loads either into any layout;
3. rank 0 writes the engine metadata (LR schedule position, step/sample counters) and the manifest, and publishes by
   rename, exactly like trainer/state/convert.py: a conversion killed at any point leaves the original untouched
   and is redone by the next launch.

Nothing is unpickled: optimizer files are read with ``weights_only=True`` and DeepSpeed's three plain classes allowed.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time

import torch
import torch.distributed as dist

from trainer.engine.parallelize import OPTIMIZER_MAP
from trainer.state import integrity
from trainer.state.convert import MODEL_STATES, model_states_file, universal_path

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
FRAGMENTS = ".fragments"


def rank_maps(checkpoint: str) -> list[dict]:
    """The ``optim_map_rank*.json`` of a model-parallel checkpoint in rank order ([] for other checkpoints)."""
    files = sorted(glob.glob(os.path.join(checkpoint, OPTIMIZER_MAP.replace("{rank:05d}", "*"))))
    maps = []
    for f in files:
        with open(f) as handle:
            maps.append(json.load(handle))
    if maps:
        world = int(maps[0]["layout"]["world"])
        ranks = [m["rank"] for m in maps]
        if ranks != list(range(world)):
            missing = sorted(set(range(world)) - set(ranks))
            raise RuntimeError(f"{checkpoint}: optimizer maps of ranks {missing} are missing (world {world}); "
                               "cannot convert it for another layout")
    return maps


def _load_optimizer(path: str) -> dict:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True)["optimizer_state_dict"]


def _folder(name: str) -> str:
    if "/" in name or name.startswith("."):
        raise ValueError(f"unexpected parameter name {name!r}")
    return name


def extract(checkpoint: str, maps: list[dict], fragments: str, rank: int = 0, world: int = 1) -> int:
    """Write every fragment of this rank's share of the optimizer files; returns how many."""
    written = 0
    for i, m in enumerate(maps):
        if i % world != rank:
            continue
        path = os.path.join(checkpoint, m["optimizer_file"])
        if not os.path.isfile(path):
            raise RuntimeError(f"{checkpoint}: rank {m['rank']}'s optimizer file {m['optimizer_file']} is missing")
        sd = _load_optimizer(path)
        tensor_rank = int(m["layout"].get("tensor", 0))
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            state = sd["base_optimizer_state"]["state"][g]
            flats = {"fp32": sd["single_partition_of_fp32_groups"][g], "exp_avg": state["exp_avg"],
                     "exp_avg_sq": state["exp_avg_sq"]}
            partition = int(m["groups"][g]["partition_index"])
            for local, frag in mapping.items():
                official = m["names"].get(local)
                if official is None:
                    raise RuntimeError(f"{path}: parameter {local} is not in rank {m['rank']}'s optimizer map")
                split = official in m["split"]
                if not split and tensor_rank != 0:
                    continue  # replicated over tensor ranks: tensor rank 0's copy is the one
                out = os.path.join(fragments, _folder(official))
                os.makedirs(out, exist_ok=True)
                piece = {k: v.narrow(0, frag.start, frag.numel).clone() for k, v in flats.items()}
                piece["step"] = torch.as_tensor(state["step"], dtype=torch.float32).clone()
                piece.update(shape=list(m["shapes"][local]), split=m["split"].get(official))
                torch.save(piece, os.path.join(out, f"t{tensor_rank if split else 0}.p{partition}.pt"))
                written += 1
    return written


def official_names(maps: list[dict]) -> list[str]:
    return sorted({official for m in maps for official in m["names"].values()})


def merge(maps: list[dict], fragments: str, out_root: str, rank: int = 0, world: int = 1) -> None:
    """Assemble this rank's share of the parameters into ``out_root/zero/<official>/``."""
    from models.parallel.tensor import merge_tensor_slices

    tensor_size = int(maps[0]["layout"].get("tensor_size", 1))
    for i, official in enumerate(official_names(maps)):
        if i % world != rank:
            continue
        folder = os.path.join(fragments, _folder(official))
        pieces: dict = {}
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            t, p = name[:-3].split(".")
            pieces.setdefault(int(t[1:]), {})[int(p[1:])] = torch.load(os.path.join(folder, name), weights_only=True)
        if not pieces:
            raise RuntimeError(f"no optimizer state found for parameter {official}")
        split = next(iter(next(iter(pieces.values())).values()))["split"]
        expected = list(range(tensor_size)) if split is not None else [0]
        if sorted(pieces) != expected:
            raise RuntimeError(f"parameter {official}: tensor slices {sorted(pieces)} found, {expected} expected")
        slices = {k: [] for k in KEYS}
        steps = set()
        for t in expected:
            parts = [pieces[t][p] for p in sorted(pieces[t])]
            shape = parts[0]["shape"]
            for k in KEYS:
                flat = torch.cat([part[k] for part in parts])
                if flat.numel() != torch.Size(shape).numel():
                    raise RuntimeError(f"parameter {official} (tensor rank {t}): {flat.numel()} {k} elements in its "
                                       f"fragments, {torch.Size(shape).numel()} expected")
                slices[k].append(flat.view(shape))
            steps.update(float(part["step"]) for part in parts)
        if len(steps) != 1:
            raise RuntimeError(f"parameter {official}: AdamW steps {sorted(steps)} differ between partitions")
        target = os.path.join(out_root, "zero", official)
        os.makedirs(target, exist_ok=True)
        for k in KEYS:
            torch.save(merge_tensor_slices(slices[k], split).clone(), os.path.join(target, f"{k}.pt"))
        torch.save(torch.tensor(steps.pop(), dtype=torch.float32), os.path.join(target, "step.pt"))


def _engine_metadata(checkpoint: str) -> dict:
    """The DeepSpeed engine counters a resume restores (elastic.load_universal reads these keys only)."""
    meta = torch.load(model_states_file(checkpoint), map_location="cpu", weights_only=True)
    return {k: meta[k] for k in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps") if k in meta}


def _agree(value, rank: int, world: int):
    """Rank 0's ``value`` on every rank (over the host gloo group)."""
    if world == 1 or not dist.is_initialized():
        return value
    from trainer.engine.distributed import host_group

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=host_group())
    return box[0]


def _barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        from trainer.engine.distributed import host_group

        dist.barrier(group=host_group())


def ensure_resharded(checkpoint: str, rank: int = 0, world: int = 1) -> tuple[str, float]:
    """Collective over ``world`` ranks (1: one process does everything): the verified conversion of the
    ZeRO-1/2 ``checkpoint`` (made now if missing or broken, in parallel); (path, seconds spent)."""
    out = universal_path(checkpoint)
    parent, tag = os.path.split(out)
    tmp = os.path.join(parent, ".tmp-" + tag)
    maps = rank_maps(checkpoint)
    if not maps:
        raise RuntimeError(f"{checkpoint} has no optimizer maps ({OPTIMIZER_MAP.format(rank=0)}, ...): it was written "
                           "before optimizer maps existed; resume it under its own layout")
    ready = rank == 0 and integrity.is_intact(out)
    if _agree(ready, rank, world):
        return out, 0.0
    started = time.perf_counter()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)  # a published but broken conversion: redo it
        os.makedirs(os.path.join(tmp, FRAGMENTS))
    _barrier(world)
    failure = None
    try:
        extract(checkpoint, maps, os.path.join(tmp, FRAGMENTS), rank, world)
    except Exception as exc:  # every rank must reach the barrier; the failure is raised after it
        failure = exc
    failure = _first_failure(failure, rank, world)
    if failure is None:
        try:
            merge(maps, os.path.join(tmp, FRAGMENTS), tmp, rank, world)
        except Exception as exc:
            failure = exc
        failure = _first_failure(failure, rank, world)
    if failure is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"converting {checkpoint} for another layout failed: {failure}")
    if rank == 0:
        shutil.rmtree(os.path.join(tmp, FRAGMENTS))
        torch.save(_engine_metadata(checkpoint), os.path.join(tmp, MODEL_STATES[0]))
        shutil.copy2(os.path.join(checkpoint, "trainer_state.json"), os.path.join(tmp, "trainer_state.json"))
        integrity.seal(tmp)
        os.rename(tmp, out)
    _barrier(world)
    return out, time.perf_counter() - started


def _first_failure(failure, rank: int, world: int):
    """Every rank learns whether any rank failed (the lowest failing rank's message), so all stop together."""
    if world == 1 or not dist.is_initialized():
        return failure
    from trainer.engine.distributed import host_group

    messages = [None] * world
    dist.all_gather_object(messages, None if failure is None else f"rank {rank}: {failure}", group=host_group())
    first = next((m for m in messages if m is not None), None)
    return None if first is None else (failure or RuntimeError(first))
