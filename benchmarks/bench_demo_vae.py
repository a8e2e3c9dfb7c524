"""Held-out reconstruction PSNR of the demo's trained AutoencoderKL vs patch-PCA, and its training time.

Why: issue #19 replaces the demo's patch-PCA encoder (block seams, clipped colours) with a small trained
VAE only if it reconstructs unseen crops clearly better. Both encoders are fitted on the demo's training
crops (seed 0, 200 per class; the VAE at 64 and 128 px, warm-started from that PCA's latents); the held-out crops
are the validation crops demo_data draws after them.

    python benchmarks/bench_demo_vae.py [--steps N] [--latent-noise L] [--threads T]
                                        [--out benchmarks/results/demo_vae.json]
                                        [--figure docs/demo_vae_reconstructions.png]

It also prints the PSNR of latents decoded after adding Gaussian noise (0.2 and 0.4 x the scaled latents' unit
std): a DiT's sampled latents are never exact, and a decoder that turns small latent errors into blobs makes
every sample look broken (``--latent-noise 0`` trains the VAE without the noise augmentation, for comparison).

``--figure``: one held-out 128 px crop per class (rows), as the photo crop, its patch-PCA round trip and its VAE
round trip (columns).
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
from data_pipeline.images import block_seam_ratios, model_to_uint8, psnr, save_image_grid  # noqa: E402
from data_pipeline.vae import DiffusersVAE, PCAVAE  # noqa: E402


def _cpu_name() -> str:
    """Training time depends on the CPU: the same 1800 steps took 127 s on one 2-core machine here and 193 s on another."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=demo_vae.TRAIN_DEFAULTS["steps"])
    parser.add_argument("--latent-noise", type=float, default=demo_vae.TRAIN_DEFAULTS["latent_noise"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/demo_vae.json")
    parser.add_argument("--figure", help="write the reconstruction comparison grid (PNG) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = DemoPhotoSource((64, 128), 200, seed=0)  # demo_data's defaults
    image_sets = [vae_training_images(source, r, 400, seed=0) for r in (64, 128)]  # [(400, 3, R, R), ...]
    pca_model = fit_pca(source, (64, 128), max_images=400, seed=0)
    val = validation_source((64, 128), 200, 20, seed=0)
    held_out = {r: torch.cat([b[r] for b in crop_batches(val, range(len(val)), [r])]) for r in (64, 128)}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        record = demo_vae.train_and_save(image_sets, folder, teacher=pca_model, steps=args.steps,
                                         latent_noise=args.latent_noise)
        wall = time.perf_counter() - started
        vae = DiffusersVAE(folder)
    pca = PCAVAE(pca_model)
    result = {"steps": args.steps, "threads": args.threads, "train_seconds": record["train_seconds"],
              "train_and_save_seconds": round(wall, 1), "held_out_crops": len(val), "psnr": {}}
    for r, x in held_out.items():
        with torch.no_grad():
            started = time.perf_counter()
            latents = {"vae": vae.encode(x)}  # (N, 4, r/8, r/8), scaled: std ≈ 1
            vae_decoded = vae.decode(latents["vae"])
            vae_seconds = time.perf_counter() - started
            latents["pca"] = pca.encode(x)
            pca_decoded = pca.decode(latents["pca"])
            v, p = psnr(x, vae_decoded), psnr(x, pca_decoded)
        result["psnr"][str(r)] = {"vae": round(v, 2), "pca": round(p, 2), "vae_round_trip_seconds": round(vae_seconds, 2)}
        print(f"{r:4d} px held-out PSNR: VAE {v:.2f} dB  patch-PCA {p:.2f} dB  ({v - p:+.2f} dB)")
        for level in (0.2, 0.4):  # noise in the scaled latent space (std ≈ 1), one fixed draw for both encoders
            with torch.no_grad():
                noisy = {}
                for name, codec in (("vae", vae), ("pca", pca)):
                    noise = torch.randn(latents[name].shape, generator=torch.Generator().manual_seed(1))
                    noisy[name] = round(psnr(x, codec.decode(latents[name] + level * noise)), 2)
            result["psnr"][str(r)][f"latent_noise_{level}"] = noisy
            print(f"{r:4d} px held-out PSNR with {level} x std latent noise: VAE {noisy['vae']:.2f} dB"
                  f"  patch-PCA {noisy['pca']:.2f} dB")
        # steps across the 8-pixel block lines / elsewhere (bench_demo_seams.py): photos ≈ 1, per-block decoders >> 1
        seams = {name: round(block_seam_ratios(model_to_uint8(images), (8,))[8], 3)
                 for name, images in (("photo", x), ("pca", pca_decoded), ("vae", vae_decoded))}
        result.setdefault("block_seam_ratio_8px", {})[str(r)] = seams
        print(f"{r:4d} px block seams (8-px lines / elsewhere): photo {seams['photo']:.3f}  patch-PCA {seams['pca']:.3f}"
              f"  VAE {seams['vae']:.3f}")
    if args.figure:
        per_class = len(val) // len(source.class_names)
        crops = held_out[128][::per_class]  # (classes, 3, 128, 128): the first held-out crop of each class
        with torch.no_grad():
            columns = [crops, pca.decode(pca.encode(crops)).clamp(-1, 1), vae.decode(vae.encode(crops))]
        save_image_grid(torch.stack(columns, 1).flatten(0, 1), args.figure, nrow=3)  # rows: classes
        print(f"figure: {args.figure}")
    print(f"VAE training: {record['train_seconds']} s for {args.steps} steps on {args.threads} thread(s)")
    result.update(command="python benchmarks/bench_demo_vae.py " + " ".join(sys.argv[1:]),
                  load_average=os.getloadavg(), cpu=_cpu_name(), model=dict(demo_vae.MODEL_CONFIG),
                  train=dict(demo_vae.TRAIN_DEFAULTS, steps=args.steps, latent_noise=args.latent_noise))
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
