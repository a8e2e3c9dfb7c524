"""How well a checkpoint's EMA model estimates the clean latent x0 from held-out latents noised to each level.

Why: a sampler's first steps fix a sample's colours and layout from the model's x0 estimate at high noise. An
epsilon-predicting diffusion model estimates x0 = (x_t - sqrt(1 - a) * eps) / sqrt(a), which multiplies the
noise-prediction error by sqrt((1 - a) / a): about 160x at t = 999 of the linear schedule. Early in training that
estimate is class-independent noise, and every sample of every class starts from it. A velocity-predicting
rectified flow estimates x0 = x_t - t * v, error not amplified. This prints, per noise level, the model's
x0-estimate MSE next to that of the trivial estimate 0 (the latents' mean; MSE = their variance, about 1):
an estimate worse than 0 carries no information about the class.

    python benchmarks/bench_x0_estimates.py RUN_DIR|CHECKPOINT [--resolution PX] [--samples 64] [--figure x0.png]
                                           [--out benchmarks/results/x0_estimates.json]

Uses the run's newest checkpoint (or the one given), its config (objective) and the validation shards at
``--resolution`` (default: the last stage's).
``--figure``: one held-out latent per class (rows): the latent decoded, then the decoded x0 estimate at each
noise level (columns, highest noise first).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_results  # noqa: E402

LEVELS = (1.0, 0.9, 0.75, 0.5, 0.25)  # fraction of the way from data (0) to pure noise (1)


def held_out_latents(directory: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, H, W), labels (N,)) from the first ``count`` samples of a shard set, round-robin over classes."""
    from data_pipeline.val_split import read_samples

    _, latents, labels = read_samples(directory)  # (M, C, H, W) float32, (M,) in manifest order
    by_class: dict[int, list] = {}
    for latent, label in zip(latents, labels.tolist()):
        by_class.setdefault(int(label), []).append(latent)
    order = [(c, i) for i in range(max(len(v) for v in by_class.values())) for c in sorted(by_class) if i < len(by_class[c])]
    order = order[:count]
    return (torch.from_numpy(np.stack([by_class[c][i] for c, i in order])),  # (N, C, H, W)
            torch.tensor([c for c, _ in order]))  # (N,)


@torch.no_grad()
def x0_estimate(objective, model, x0: torch.Tensor, labels: torch.Tensor, level: float, generator) -> torch.Tensor:
    """The model's estimate of ``x0`` from x0 noised to ``level`` (diffusion: t = level x (T - 1); flow: t = level)."""
    noise = torch.randn(x0.shape, generator=generator)  # (N, C, H, W)
    if hasattr(objective, "velocity"):  # rectified flow: x_t = (1 - t) x0 + t noise, x0 = x_t - t v
        t = torch.full((len(x0),), level)
        x_t = objective.interpolate(x0, noise, t)
        return x_t - level * objective.velocity(model, x_t, t, {"y": labels})
    diffusion = objective.diffusion
    step = int(round(level * (diffusion.num_timesteps - 1)))
    t = torch.full((len(x0),), step)
    x_t = diffusion.q_sample(x0, t, noise=noise)
    eps = model(x_t, t, labels)[:, : x0.shape[1]]  # the first C channels; a learned sigma follows
    kept = float(diffusion.alphas_cumprod[step])
    return (x_t - (1 - kept) ** 0.5 * eps) / kept ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (its newest checkpoint) or one checkpoint directory")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the run's last stage's)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/x0_estimates.json")
    parser.add_argument("--figure", help="write decoded x0 estimates (rows: classes, columns: noise levels) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from data_pipeline.images import save_image_grid
    from data_pipeline.val_split import recorded_val_dir
    from data_pipeline.vae import load_vae_from_manifest
    from trainer.engine.objective import build_objective_from_config
    from trainer.state.consolidate import load_ema_model, open_run_checkpoint

    checkpoint, run_dir, cfg, shards = open_run_checkpoint(args.run, args.resolution, None)
    model, arch = load_ema_model(checkpoint, input_size=shards.latent_shape[1], device=torch.device("cpu"))
    model.eval()
    objective = build_objective_from_config(cfg, arch.learn_sigma)
    validation = recorded_val_dir(shards.directory, shards.manifest) or shards.directory
    x0, labels = held_out_latents(validation, args.samples)
    generator = torch.Generator().manual_seed(0)
    rows, estimates = [], []
    print(f"{checkpoint}: objective {cfg.objective.kind}, {len(x0)} held-out latents of {validation} "
          f"(variance {float(x0.var()):.3f}: the MSE of the estimate 0)")
    for level in LEVELS:
        estimate = x0_estimate(objective, model, x0, labels, level, generator)  # (N, C, H, W)
        mse = float(((estimate - x0) ** 2).mean())
        rows.append({"level": level, "x0_mse": mse, "x0_estimate_std": float(estimate.std()),
                     "better_than_zero": mse < float(x0.var())})
        estimates.append(estimate)
        print(f"  noise level {level:.2f}: x0-estimate MSE {mse:10.3f}, estimate std {float(estimate.std()):7.2f}")
    write_results(args.out, {"checkpoint": os.path.abspath(checkpoint), "objective": cfg.objective.kind,
                             "resolution": shards.manifest["resolution"],
                             "samples": len(x0), "latent_variance": float(x0.var()), "levels": rows})
    if args.figure:
        first = [int((labels == c).nonzero()[0]) for c in sorted(set(labels.tolist()))]  # one latent per class
        columns = [x0[first]] + [e[first] for e in estimates]  # each (K, C, H, W)
        vae = load_vae_from_manifest(shards.directory, device=torch.device("cpu"))
        grid = torch.stack(columns, 1).flatten(0, 1)  # (K * columns, C, H, W): row-major, one row per class
        save_image_grid(vae.decode(grid), args.figure, nrow=len(columns))
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
