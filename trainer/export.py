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


def open_run_checkpoint(checkpoint: str, resolution: int | None = None, config: str | None = None):
    """(checkpoint dir, run dir, run config, shard set) for the sampling tools (sample, evaluate).

    ``checkpoint`` as for ``resolve_checkpoint``; the run's config.yaml unless ``config`` is given; the shard set
    of the last stage, at ``resolution`` pixels if given. FileNotFoundError / ConfigError name what is missing.
    """
    from trainer.config import load_config
    from trainer.data import open_shard_set
    from trainer.stages import resolve_stages

    ck = resolve_checkpoint(checkpoint)
    run_dir = os.path.dirname(os.path.dirname(ck))
    cfg = load_config(config or os.path.join(run_dir, "config.yaml"))
    stage = resolve_stages(cfg)[-1]
    return ck, run_dir, cfg, open_shard_set(stage.data_root, resolution or stage.resolution)


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
    if "layout" in parts[0]:
        # Tensor/pipeline/expert-parallel layouts: official names per rank + how tensor slices merge.
        from trainer.parallelize import merge_states

        return merge_states(parts), arch
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


def model_from_ema(tensors: dict, arch: dict, device="cpu", source: str = "the run"):
    """A plain DiT holding EMA weights; the fixed pos_embed table is rebuilt for ``arch['input_size']``."""
    from trainer.model_factory import build_model

    model = build_model(arch)
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
        arch = dict(arch, input_size=input_size)
    return model_from_ema(tensors, arch, device, source=checkpoint), arch


def consolidated_weights(checkpoint: str) -> tuple[dict, dict]:
    """(trained, non-EMA weights under official names, architecture dict) from any layout's checkpoint.

    Tensor/pipeline/expert-parallel layouts: the ``model_rank*.pt`` slices (trainer/parallelize.py);
    data parallel: DeepSpeed's ``mp_rank_00_model_states.pt``, or its ZeRO-3 partitions via zero_to_fp32.
    """
    arch = read_trainer_state(checkpoint).model_config
    slices = sorted(glob.glob(os.path.join(checkpoint, "model_rank*.pt")))
    if slices:
        from trainer.parallelize import merge_states

        return merge_states([torch.load(s, map_location="cpu", weights_only=True) for s in slices]), arch
    shapes = _model_shapes(arch)
    states = os.path.join(checkpoint, "mp_rank_00_model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False).get("module") if os.path.exists(states) else None
    if not module or any(n in module and module[n].numel() != _numel(s) for n, s in shapes.items()):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(checkpoint), tag=os.path.basename(checkpoint))
    return {n: v.float().clone() for n, v in module.items() if n in shapes and n != "pos_embed"}, arch  # fixed table


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def export_official(checkpoint: str, out_path: str, weights: str = "ema") -> str:
    """Write the EMA (or, weights="model", the trained) weights as a facebookresearch/DiT-style ``.pt`` state
    dict (+ arch JSON beside it), from a checkpoint of any parallel layout."""
    if weights == "model":
        from trainer.model_factory import build_model

        tensors, arch = consolidated_weights(checkpoint)
        model = build_model(arch)
        missing = [k for k in model.load_state_dict(tensors, strict=False).missing_keys if k != "pos_embed"]
        if missing:
            raise RuntimeError(f"weights of {checkpoint} lack {missing[:5]}")
    elif weights == "ema":
        model, arch = load_ema_model(checkpoint)
    else:
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = out_path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, out_path)
    with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
        json.dump(arch, f, indent=2)
    return out_path


# --------------------------------------------------------------------------- diffusers
# diffusers' DiTTransformer2DModel computes timestep features with frequencies / (half - 1) where the
# official DiT divides by half (models/convert.py). The exported weights are exactly the official ones in
# diffusers' layout -- the same convention as facebook/DiT-XL-2-256 on the hub -- so stock diffusers gives
# outputs within a small timestep-feature difference of ours; after
# ``models.convert.align_diffusers_timestep_embedding(model)`` they equal ours (tests/test_export_diffusers.py).


def diffusers_transformer(checkpoint: str, input_size: int | None = None):
    """A ``DiTTransformer2DModel`` holding the checkpoint's EMA weights (stock timestep features)."""
    from diffusers import DiTTransformer2DModel

    from models.convert import diffusers_config, official_to_diffusers

    model, arch = load_ema_model(checkpoint, input_size=input_size)
    transformer = DiTTransformer2DModel(**diffusers_config(arch))
    transformer.load_state_dict(official_to_diffusers(model.state_dict(), arch), strict=True)
    return transformer.eval(), arch


def diffusers_scheduler(run_config: dict | None):
    """The diffusers scheduler matching the run's Gaussian diffusion (DDIM over the same betas), or None
    for objectives DiTPipeline cannot sample (rectified flow)."""
    from diffusers import DDIMScheduler

    objective = (run_config or {}).get("objective") or {}
    if objective.get("kind", "diffusion") != "diffusion":
        return None
    schedule = objective.get("noise_schedule", "linear")
    beta_schedule = "linear" if schedule == "linear" else "squaredcos_cap_v2"
    return DDIMScheduler(num_train_timesteps=int(objective.get("diffusion_steps", 1000)), beta_start=0.0001,
                         beta_end=0.02, beta_schedule=beta_schedule, clip_sample=False, set_alpha_to_one=False)


def _run_config(checkpoint: str) -> dict | None:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "config.yaml")
    if not os.path.exists(path):
        return None
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def _shards_vae(run_config: dict | None) -> tuple[str | None, dict]:
    """(diffusers VAE path or hub id, class names) from the run's last-stage shard manifest, if any."""
    if not run_config:
        return None, {}
    stages = run_config.get("stages") or []
    data = run_config.get("data") or {}
    root = (stages[-1].get("data_root") if stages else None) or data.get("root")
    resolution = stages[-1].get("resolution") if stages else data.get("resolution")
    manifest_path = os.path.join(str(root), str(resolution), "manifest.json")
    if not root or not os.path.exists(manifest_path):
        return None, {}
    with open(manifest_path) as f:
        manifest = json.load(f)
    vae = manifest.get("vae") or {}
    names = {i: n for i, n in enumerate(manifest.get("class_names") or [])}
    return (vae.get("name_or_path") if vae.get("type") == "diffusers" else None), names


def export_diffusers(checkpoint: str, out_dir: str, vae: str | None = "auto", input_size: int | None = None) -> dict:
    """Write ``out_dir/transformer`` (DiTTransformer2DModel) and, when a diffusers VAE is known (``vae``: a
    local AutoencoderKL folder / hub id, or "auto" = the shards' VAE when it is a diffusers one) and the
    objective is Gaussian diffusion, a complete ``DiTPipeline`` in ``out_dir`` (transformer, vae, scheduler).
    Returns what was written."""
    transformer, arch = diffusers_transformer(checkpoint, input_size=input_size)
    run_config = _run_config(checkpoint)
    names = {}
    if vae == "auto":
        vae, names = _shards_vae(run_config)
    scheduler = diffusers_scheduler(run_config)
    os.makedirs(out_dir, exist_ok=True)
    written = {"transformer": os.path.join(out_dir, "transformer"), "pipeline": None}
    if vae and scheduler is not None:
        from diffusers import AutoencoderKL, DiTPipeline

        pipe = DiTPipeline(transformer=transformer, vae=AutoencoderKL.from_pretrained(vae), scheduler=scheduler,
                           id2label={i: n for i, n in names.items()} or None)
        pipe.save_pretrained(out_dir)
        written["pipeline"] = out_dir
        if arch["num_classes"] != 1000:
            written["note"] = (f"DiTPipeline hard-codes the null class id 1000 (ImageNet); this model has "
                               f"{arch['num_classes']} classes, so sample it with guidance_scale=1 there, or use "
                               f"python -m trainer.sample for classifier-free guidance")
    else:
        transformer.save_pretrained(written["transformer"])
        if scheduler is not None:
            scheduler.save_pretrained(os.path.join(out_dir, "scheduler"))
        written["note"] = ("transformer only: " + ("no diffusers VAE (the shards use another encoder)" if not vae
                           else "the objective is not Gaussian diffusion, which DiTPipeline samples"))
    with open(os.path.join(out_dir, "dit_arch.json"), "w") as f:
        json.dump({"arch": arch, "source_checkpoint": os.path.abspath(checkpoint), **written}, f, indent=2)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Export a checkpoint's EMA weights as an official DiT state dict "
                                            "(--out x.pt) or a diffusers model/pipeline folder (--diffusers DIR).")
    p.add_argument("checkpoint", help="run dir, checkpoints dir or one checkpoint dir")
    p.add_argument("--out", default=None, help="output .pt path (official facebookresearch/DiT state dict)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="--out writes the EMA (default) or the trained weights; any parallel layout is merged")
    p.add_argument("--diffusers", default=None, metavar="DIR", help="output folder for DiTTransformer2DModel "
                   "(+ DiTPipeline when the shards' VAE is a diffusers AutoencoderKL)")
    p.add_argument("--vae", default="auto", help="diffusers AutoencoderKL folder or hub id for the pipeline "
                   "(default: the shards' VAE when it is a diffusers one; 'none' for the transformer only)")
    args = p.parse_args(argv)
    if not args.out and not args.diffusers:
        p.error("give --out FILE.pt and/or --diffusers DIR")
    try:
        ck = resolve_checkpoint(args.checkpoint)
        if args.out:
            print(export_official(ck, args.out, weights=args.weights))
        if args.diffusers:
            written = export_diffusers(ck, args.diffusers, vae=None if args.vae == "none" else args.vae)
            print(written["pipeline"] or written["transformer"])
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
