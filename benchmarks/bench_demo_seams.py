"""Block seams and repeated texture in sample grids, on the 8- and 16-pixel grids.

Why: issue #19 asks for demo samples without block seams. Two grids can draw them: the VAE's latent grid
(8 pixels: the patch-PCA decodes each 8x8 block on its own) and the DiT's token grid (16 pixels: a token
predicts 2x2 latents). Two measures, photos score about 1.0 on both:
- seams, ``data_pipeline.images.block_seam_ratios``: the pixel steps across each set of lines against the steps
  on no line (patch-PCA reconstructions about 5);
- texture, ``data_pipeline.images.periodic_texture_ratios``: the spectral power of a pattern repeated every 8 or
  16 pixels against the neighbouring frequencies; this sees a soft blob drawn in every token cell, which has no
  step on the lines for the seam ratio to see.

    python benchmarks/bench_demo_seams.py GRID.png [GRID.png ...] [--tile 128] [--out benchmarks/results/demo_seams.json]
    python benchmarks/bench_demo_seams.py GRID.png --run RUN_DIR   # also the seams in the run's latents

The grids are PNGs written by ``save_image_grid`` (the trainer's sample grids, bench_demo_vae's ``--figure``).
``--run``: samples the run's final grid again (newest checkpoint, EMA, the run's sampler settings) and measures the
seams before the VAE: the mean step between neighbouring latent pixels across a token border against the step
inside a token, for the sampled latents and for held-out latents; whether the decoder or the DiT draws the seams.
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
from data_pipeline.images import block_seam_ratios, periodic_texture_ratios, read_image_grid  # noqa: E402


def latent_seams(run: str, threads: int) -> dict:
    from data_pipeline.val_split import read_samples, recorded_val_dir
    from trainer.engine.objective import build_objective_from_config
    from trainer.monitor.sampling import sample_latents
    from trainer.state.consolidate import load_ema_model, open_run_checkpoint

    torch.set_num_threads(threads)
    checkpoint, _, cfg, shards = open_run_checkpoint(run, None, None)
    model, arch = load_ema_model(checkpoint, input_size=shards.latent_shape[1], device=torch.device("cpu"))
    s = cfg.sample
    classes = list(s.classes) or list(range(arch.num_classes))
    sampled = sample_latents(model, build_objective_from_config(cfg, arch.learn_sigma), classes=classes,
                             per_class=s.per_class, latent_shape=shards.latent_shape, cfg_scale=s.cfg_scale,
                             steps=s.steps, method=s.method, seed=s.seed, device=torch.device("cpu"),
                             num_classes=arch.num_classes)  # (K * per_class, C, h, w): the trainer's final grid
    validation = recorded_val_dir(shards.directory, shards.manifest) or shards.directory
    _, held_out, _ = read_samples(validation, limit=256)  # (N, C, h, w)

    def token_border_ratio(latents: np.ndarray) -> float:  # (N, C, h, w): the seam ratio on the token lines
        return round(block_seam_ratios(latents.transpose(0, 2, 3, 1), (arch.patch_size,))[arch.patch_size], 3)

    result = {"checkpoint": os.path.abspath(checkpoint), "patch_size": arch.patch_size,
              "sampled": token_border_ratio(sampled.numpy()), "held_out": token_border_ratio(held_out)}
    print(f"{checkpoint}: latent step across token borders / inside tokens: sampled x{result['sampled']:.3f}, "
          f"held-out x{result['held_out']:.3f}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("grids", nargs="+")
    parser.add_argument("--tile", type=int, default=128, help="tile side in pixels")
    parser.add_argument("--periods", type=int, nargs="+", default=[8, 16], help="line spacings to measure")
    parser.add_argument("--out", default="benchmarks/results/demo_seams.json")
    parser.add_argument("--run", help="also measure the seams in this run's sampled latents (see above)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = {"command": "python benchmarks/bench_demo_seams.py " + " ".join(sys.argv[1:]), "grids": {}}
    for path in args.grids:
        tiles = read_image_grid(path, args.tile)  # (N, tile, tile, 3)
        ratios = block_seam_ratios(tiles, args.periods)
        texture = periodic_texture_ratios(tiles, args.periods)
        result["grids"][path] = {"tiles": len(tiles), **{f"lines_{p}px": round(r, 3) for p, r in ratios.items()},
                                 **{f"texture_{p}px": round(r, 3) for p, r in texture.items()}}
        print(f"{path}: {len(tiles)} tiles; seams " + ", ".join(f"{p}-px lines x{r:.3f}" for p, r in ratios.items())
              + "; texture " + ", ".join(f"{p}-px repeat x{r:.2f}" for p, r in texture.items()))
    if args.run:
        result["latents"] = latent_seams(args.run, args.threads)
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
