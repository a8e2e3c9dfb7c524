"""``python -m trainer.export``: a checkpoint of any layout → the official facebookresearch/DiT ``.pt`` state
dict, or a diffusers ``DiTTransformer2DModel`` folder (+ ``DiTPipeline``).

The consolidation itself (EMA shards, model-parallel slices) is trainer/state/consolidate.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from trainer.rundir import CONFIG
from trainer.state.consolidate import consolidated_weights, load_ema_model, resolve_checkpoint


def export_official(checkpoint: str, out_path: str, weights: str = "ema") -> str:
    """Write the EMA (or, weights="model", the trained) weights as a facebookresearch/DiT-style ``.pt`` state
    dict (+ arch JSON beside it), from a checkpoint of any parallel layout."""
    if weights == "model":
        tensors, arch = consolidated_weights(checkpoint)
        model = arch.build()
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
        json.dump(arch.to_dict(), f, indent=2)
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
    transformer = DiTTransformer2DModel(**diffusers_config(arch.to_dict()))
    transformer.load_state_dict(official_to_diffusers(model.state_dict(), arch.to_dict()), strict=True)
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
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), CONFIG)
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
        if arch.num_classes != 1000:
            written["note"] = (f"DiTPipeline hard-codes the null class id 1000 (ImageNet); this model has "
                               f"{arch.num_classes} classes, so sample it with guidance_scale=1 there, or use "
                               f"python -m trainer.sample for classifier-free guidance")
    else:
        transformer.save_pretrained(written["transformer"])
        if scheduler is not None:
            scheduler.save_pretrained(os.path.join(out_dir, "scheduler"))
        written["note"] = ("transformer only: " + ("no diffusers VAE (the shards use another encoder)" if not vae
                           else "the objective is not Gaussian diffusion, which DiTPipeline samples"))
    with open(os.path.join(out_dir, "dit_arch.json"), "w") as f:
        json.dump({"arch": arch.to_dict(), "source_checkpoint": os.path.abspath(checkpoint), **written}, f, indent=2)
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
