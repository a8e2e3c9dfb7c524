"""``python -m trainer.sample RUN_DIR|CHECKPOINT --out grid.png``: class-conditional EMA sample grid.

Uses the run's resolved config for the objective and shards (for the VAE that decodes latents),
and the checkpoint's EMA weights; guidance scale, sampler, steps and seed from the command line.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Sample a class-conditional grid from a DiT checkpoint.")
    p.add_argument("checkpoint", help="run dir (newest checkpoint), checkpoints dir, or one checkpoint dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/samples/sample-<tag>.png)")
    p.add_argument("--config", default=None, help="run config (default: config.yaml of the run dir)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: last stage's)")
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--method", default=None, choices=["ddim", "ddpm", "euler", "heun"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--classes", type=int, nargs="*", default=None)
    p.add_argument("--per-class", type=int, default=None)
    args = p.parse_args(argv)

    from trainer.config.schema import ConfigError
    from data_pipeline.vae import load_vae_from_manifest
    from trainer.state.consolidate import load_ema_model, open_run_checkpoint
    from trainer.engine.objective import build_objective_from_config
    from trainer.monitor.sampling import describe_latent_range, sample_grid

    try:
        ck, run_dir, cfg, shards = open_run_checkpoint(args.checkpoint, args.resolution, args.config)
    except (FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, arch = load_ema_model(ck, input_size=shards.latent_shape[1], device=device)
    objective = build_objective_from_config(cfg, arch.learn_sigma)
    s = cfg.sample
    classes = args.classes if args.classes is not None else (list(s.classes) or list(range(arch.num_classes)))
    out = args.out or os.path.join(run_dir, "samples", f"sample-{os.path.basename(ck)}.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    vae = load_vae_from_manifest(shards.directory, device=device)  # decodes where the samples are
    _, spread = sample_grid(model, objective, vae, out, classes=classes,
                            per_class=args.per_class or s.per_class, latent_shape=shards.latent_shape,
                            cfg_scale=s.cfg_scale if args.cfg_scale is None else args.cfg_scale,
                            steps=args.steps or s.steps, method=args.method or s.method,
                            seed=s.seed if args.seed is None else args.seed, device=device,
                            num_classes=arch.num_classes)
    print(out)
    print(describe_latent_range(spread), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
