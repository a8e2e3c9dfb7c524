"""Held-out reconstruction PSNR of the demo's trained AutoencoderKL vs patch-PCA, and its training time.

Why: issue #19 replaces the demo's patch-PCA encoder (block seams, clipped colours) with a small trained
VAE only if it reconstructs unseen crops clearly better. Both encoders are fitted on the demo's training
crops (seed 0, 200 per class); the held-out crops are the validation crops demo_data draws after them.

    python benchmarks/bench_demo_vae.py [--steps N] [--threads T] [--out benchmarks/results/demo_vae.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_results  # noqa: E402
from data_pipeline import demo_vae  # noqa: E402
from data_pipeline.demo_data import DemoPhotoSource, validation_source, vae_training_images  # noqa: E402
from data_pipeline.encode import crop_batches, fit_pca  # noqa: E402
from data_pipeline.images import psnr  # noqa: E402
from data_pipeline.vae import DiffusersVAE, PCAVAE  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=demo_vae.TRAIN_DEFAULTS["steps"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/demo_vae.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = DemoPhotoSource((64, 128), 200, seed=0)  # demo_data's defaults
    images = vae_training_images(source, 128, 400, seed=0)  # (400, 3, 128, 128)
    val = validation_source((64, 128), 200, 20, seed=0)
    held_out = {r: torch.cat([b[r] for b in crop_batches(val, range(len(val)), [r])]) for r in (64, 128)}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        record = demo_vae.train_and_save(images, folder, steps=args.steps)
        wall = time.perf_counter() - started
        vae = DiffusersVAE(folder)
    pca = PCAVAE(fit_pca(source, (64, 128), max_images=400, seed=0))
    result = {"steps": args.steps, "threads": args.threads, "train_seconds": record["train_seconds"],
              "train_and_save_seconds": round(wall, 1), "held_out_crops": len(val), "psnr": {}}
    for r, x in held_out.items():
        with torch.no_grad():
            started = time.perf_counter()
            v = psnr(x, vae.decode(vae.encode(x)))
            vae_seconds = time.perf_counter() - started
            p = psnr(x, pca.decode(pca.encode(x)))
        result["psnr"][str(r)] = {"vae": round(v, 2), "pca": round(p, 2), "vae_round_trip_seconds": round(vae_seconds, 2)}
        print(f"{r:4d} px held-out PSNR: VAE {v:.2f} dB  patch-PCA {p:.2f} dB  ({v - p:+.2f} dB)")
    print(f"VAE training: {record['train_seconds']} s for {args.steps} steps on {args.threads} thread(s)")
    result.update(command="python benchmarks/bench_demo_vae.py " + " ".join(sys.argv[1:]),
                  load_average=os.getloadavg(), model=dict(demo_vae.MODEL_CONFIG),
                  train=dict(demo_vae.TRAIN_DEFAULTS, steps=args.steps))
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
