"""Checkpoint → one consolidated EMA state dict in the official facebookresearch/DiT layout.

EMA files are written as a full copy (``ema.pt``) or, under ZeRO-3, as per-rank partitions
(``ema_rank*.pt``); ZeRO-3 partitions every parameter independently into ``ceil(numel / world)``
chunks, so concatenating the ranks' chunks in rank order and trimming to ``numel`` restores it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

from trainer.checkpoint import find_resumable, read_trainer_state, verify_checkpoint


def resolve_checkpoint(path: str) -> str:
    """A run dir (newest complete checkpoint), a checkpoints/ dir, or one checkpoint dir."""
    path = path.rstrip("/")
    for candidate in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(candidate) and not os.path.exists(os.path.join(candidate, "trainer_state.json")):
            found = find_resumable(candidate)
            if found:
                return found
    problem = verify_checkpoint(path)
    if problem:
        raise FileNotFoundError(f"no complete checkpoint at {path}: {problem}")
    return path


def _model_shapes(arch: dict) -> dict:
    from trainer.model_factory import build_model

    with torch.device("meta"):
        model = build_model(arch)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def consolidated_ema(checkpoint: str) -> tuple[dict, dict]:
    """(state dict of EMA weights with official keys, architecture dict) from a checkpoint dir."""
    arch = read_trainer_state(checkpoint).model_config
    full = os.path.join(checkpoint, "ema.pt")
    if os.path.exists(full):
        state = torch.load(full, map_location="cpu", weights_only=True)
        return dict(state["tensors"]), arch
    shards = sorted(glob.glob(os.path.join(checkpoint, "ema_rank*.pt")))
    if not shards:
        raise FileNotFoundError(f"{checkpoint} holds no EMA file (ema.pt or ema_rank*.pt)")
    parts = [torch.load(s, map_location="cpu", weights_only=True) for s in shards]
    if not parts[0].get("sharded"):
        # Model-parallel layouts write one file per rank with disjoint names; merge them.
        out = {}
        for p in parts:
            out.update(p["tensors"])
        return out, arch
    shapes = _model_shapes(arch)
    out = {}
    for name, shape in shapes.items():
        if name not in parts[0]["tensors"]:
            continue
        numel = 1
        for d in shape:
            numel *= d
        flat = torch.cat([p["tensors"][name].reshape(-1) for p in parts])[:numel]
        out[name] = flat.view(shape).clone()
    return out, arch


def load_ema_model(checkpoint: str, input_size: int | None = None, device="cpu"):
    """A plain DiT holding the checkpoint's EMA weights (pos_embed rebuilt for ``input_size``)."""
    from trainer.model_factory import build_model

    tensors, arch = consolidated_ema(checkpoint)
    if input_size is not None:
        arch = dict(arch, input_size=input_size)
    model = build_model(arch)
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if k != "pos_embed"]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"EMA of {checkpoint} does not match the model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval(), arch


def export_official(checkpoint: str, out_path: str) -> str:
    """Write the EMA weights as a facebookresearch/DiT-style ``.pt`` state dict (+ arch JSON beside it)."""
    model, arch = load_ema_model(checkpoint)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = out_path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, out_path)
    with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
        json.dump(arch, f, indent=2)
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Export a checkpoint's EMA weights as an official DiT state dict.")
    p.add_argument("checkpoint", help="run dir, checkpoints dir or one checkpoint dir")
    p.add_argument("--out", required=True, help="output .pt path")
    args = p.parse_args(argv)
    try:
        ck = resolve_checkpoint(args.checkpoint)
        print(export_official(ck, args.out))
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
