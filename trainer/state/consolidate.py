"""Checkpoint → consolidated states: the EMA and the trained weights of any layout under official DiT names.

Used by the loop (sample grids from the EMA), and by the tools (sample, evaluate, export).
EMA files are written as a full copy (``ema.pt``) or, under ZeRO-3, as per-rank partitions
(``ema_rank*.pt``); ZeRO-3 partitions every parameter independently into ``ceil(numel / world)``
chunks, so concatenating the ranks' chunks in rank order and trimming to ``numel`` restores it.
Tensor/pipeline/expert-parallel layouts write per-rank files under official names with a split spec
(trainer/state/parallel_ema.py ``merge_states``).
"""
from __future__ import annotations

import glob
import os

import torch

from models.args import DiTArgs
from trainer.rundir import CONFIG, checkpoints_dir
from trainer.state.checkpoint import find_resumable, read_trainer_state, verify_checkpoint


def resolve_checkpoint(path: str) -> str:
    """A run dir (newest complete checkpoint), a checkpoints/ dir, or one checkpoint dir."""
    path = path.rstrip("/")
    for candidate in (checkpoints_dir(path), path):
        if os.path.isdir(candidate) and not os.path.exists(os.path.join(candidate, "trainer_state.json")):
            found = find_resumable(candidate)
            if found:
                return found
    problem = verify_checkpoint(path)
    if problem:
        raise FileNotFoundError(f"no complete checkpoint at {path}: {problem}")
    return path


def open_run_checkpoint(checkpoint: str, resolution: int | None = None, config: str | None = None):
    """(checkpoint dir, run dir, run config, shard set) for the sampling tools (sample, evaluate).

    ``checkpoint`` as for ``resolve_checkpoint``; the run's config.yaml unless ``config`` is given; the shard set
    of the last stage, at ``resolution`` pixels if given. FileNotFoundError / ConfigError name what is missing.
    """
    from trainer.config.schema import load_config
    from trainer.config.shards import open_shard_set
    from trainer.config.stages import resolve_stages

    ck = resolve_checkpoint(checkpoint)
    run_dir = os.path.dirname(os.path.dirname(ck))
    cfg = load_config(config or os.path.join(run_dir, CONFIG))
    stage = resolve_stages(cfg)[-1]
    return ck, run_dir, cfg, open_shard_set(stage.data_root, resolution or stage.resolution)


def _model_shapes(arch: DiTArgs) -> dict:
    with torch.device("meta"):
        model = arch.build()
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def checkpoint_args(checkpoint: str) -> DiTArgs:
    """The ``DiTArgs`` a checkpoint was trained with (its trainer_state.json ``model_config``)."""
    return DiTArgs.from_dict(read_trainer_state(checkpoint).model_config)


def _concat_partitions(parts: list[dict], arch: DiTArgs) -> dict:
    """ZeRO-3 per-rank partitions (rank order) → full tensors: each parameter was split into ceil(numel / world)
    chunks, so concatenating the ranks' chunks and trimming to numel restores it."""
    shapes = _model_shapes(arch)
    out = {}
    for name, shape in shapes.items():
        if name not in parts[0]["tensors"]:
            continue
        flat = torch.cat([p["tensors"][name].reshape(-1) for p in parts])[:_numel(shape)]
        out[name] = flat.view(shape).clone()
    return out


def consolidated_ema(checkpoint: str) -> tuple[dict, DiTArgs]:
    """(state dict of EMA weights with official keys, the model's DiTArgs) from a checkpoint dir."""
    arch = checkpoint_args(checkpoint)
    full = os.path.join(checkpoint, "ema.pt")
    if os.path.exists(full):
        state = torch.load(full, map_location="cpu", weights_only=True)
        return dict(state["tensors"]), arch
    shards = sorted(glob.glob(os.path.join(checkpoint, "ema_rank*.pt")))
    if not shards:
        raise FileNotFoundError(f"{checkpoint} holds no EMA file (ema.pt or ema_rank*.pt)")
    parts = [torch.load(s, map_location="cpu", weights_only=True) for s in shards]
    if "layout" in parts[0]:
        # Tensor/pipeline/expert-parallel layouts: official names per rank + how tensor slices merge.
        from trainer.state.parallel_ema import merge_states

        return merge_states(parts), arch
    if not parts[0].get("sharded"):
        # Model-parallel layouts write one file per rank with disjoint names; merge them.
        out = {}
        for p in parts:
            out.update(p["tensors"])
        return out, arch
    return _concat_partitions(parts, arch), arch


def model_from_ema(tensors: dict, arch: DiTArgs, device="cpu", source: str = "the run"):
    """A plain DiT holding EMA weights; the fixed pos_embed table is rebuilt for ``arch.input_size``."""
    model = arch.build()
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if k != "pos_embed"]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"EMA of {source} does not match the model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval()


def load_ema_model(checkpoint: str, input_size: int | None = None, device="cpu"):
    """A plain DiT holding the checkpoint's EMA weights (pos_embed rebuilt for ``input_size``)."""
    tensors, arch = consolidated_ema(checkpoint)
    if input_size is not None:
        arch = arch.with_input_size(input_size)
    return model_from_ema(tensors, arch, device, source=checkpoint), arch


def consolidated_weights(checkpoint: str) -> tuple[dict, DiTArgs]:
    """(trained, non-EMA weights under official names, the model's DiTArgs) from any layout's checkpoint.

    Tensor/pipeline/expert-parallel layouts: the ``model_rank*.pt`` slices (trainer/engine/parallelize.py);
    ZeRO-3: the ``weights_rank*.pt`` partitions; ZeRO-0/1/2: DeepSpeed's ``mp_rank_00_model_states.pt``. Everything is
    read with ``weights_only=True``: nothing from a run directory is unpickled.
    """
    arch = checkpoint_args(checkpoint)
    slices = sorted(glob.glob(os.path.join(checkpoint, "model_rank*.pt")))
    if slices:
        from trainer.state.parallel_ema import merge_states

        return merge_states([torch.load(s, map_location="cpu", weights_only=True) for s in slices]), arch
    partitions = sorted(glob.glob(os.path.join(checkpoint, "weights_rank*.pt")))
    if partitions:  # ZeRO-3: every rank's fp32 partition (trainer/engine/parallelize.py save_extra)
        module = _concat_partitions([torch.load(s, map_location="cpu", weights_only=True) for s in partitions], arch)
    else:  # ZeRO-0/1/2: DeepSpeed's model file holds the full weights; tensors and plain types only
        states = os.path.join(checkpoint, "mp_rank_00_model_states.pt")
        if not os.path.exists(states):
            raise FileNotFoundError(f"{checkpoint} holds no trained weights (model_rank*.pt, weights_rank*.pt or "
                                    "mp_rank_00_model_states.pt); --weights ema works from the EMA files")
        module = torch.load(states, map_location="cpu", weights_only=True)["module"]
    shapes = _model_shapes(arch)
    return {n: v.float().clone() for n, v in module.items() if n in shapes and n != "pos_embed"}, arch  # fixed table


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
