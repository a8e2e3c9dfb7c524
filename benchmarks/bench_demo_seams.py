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

The grids are PNGs written by ``save_image_grid`` (the trainer's sample grids, bench_demo_vae's ``--figure``).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_results  # noqa: E402
from data_pipeline.images import block_seam_ratios, periodic_texture_ratios, read_image_grid  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("grids", nargs="+")
    parser.add_argument("--tile", type=int, default=128, help="tile side in pixels")
    parser.add_argument("--periods", type=int, nargs="+", default=[8, 16], help="line spacings to measure")
    parser.add_argument("--out", default="benchmarks/results/demo_seams.json")
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
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
