"""A small real diffusers AutoencoderKL, trained in about two minutes on the demo photos' crops.

Why: the patch-PCA encoder is linear per 8x8 block and clips, so decoded demo samples are mosaics with
seams. A convolutional VAE with SD-VAE's shape (8x downsampling, 4 latent channels) but few channels
learns overlapping, non-linear decoders, which should give seamless samples. It is saved with
``save_pretrained`` so the demo's encode, sample and report paths load it exactly as they load a hub VAE
(``data_pipeline.vae.DiffusersVAE``), with ``scaling_factor``/``shift_factor`` computed from its own
encoded latents the way SD's 0.18215 (1 / std) and SD3's shift (mean) were.

Training is deterministic given the seed: fixed step count, seeded crop positions and posterior noise,
one thread-count-independent data order (the float results may still differ across CPU types).
``python benchmarks/bench_demo_vae.py`` prints held-out PSNR, this VAE vs patch-PCA. Not yet the demo's default
(issue #19): at this budget it still reconstructs held-out crops worse than the PCA (benchmarks/results/demo_vae.json).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

DEMO_VAE_DIR = "vae"  # folder beside the shard sets (OUT/vae/)
TRAIN_CONFIG_FILE = "demo_vae_training.json"  # what the folder was trained with: a rerun reuses it only if equal

# SD-VAE shape (4 levels -> 8x down, 4 latent channels), few channels and no mid-block attention so
# ~2 minutes of 2-core CPU training reach a useful fit.
# One normalisation group: with few channels, several groups normalise away each image's colour balance at full
# resolution (4 groups vs 1 on channels (8,16,32,64): 19.6 / 20.2 dB vs 20.3 / 21.7 held-out at 64 / 128 px).
MODEL_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=1,
    block_out_channels=(16, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    mid_block_add_attention=False,
)
TRAIN_DEFAULTS = dict(steps=600, batch_size=32, crop=32, lr=2e-3, kl_weight=1e-6, seed=0)


def build_model(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**MODEL_CONFIG)


def random_crops(images: torch.Tensor, crop: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(N, 3, R, R) -> (B, 3, crop, crop): seeded image choice, position and horizontal flip."""
    n, _, height, width = images.shape
    index = torch.randint(0, n, (batch_size,), generator=generator)
    top = torch.randint(0, height - crop + 1, (batch_size,), generator=generator)
    left = torch.randint(0, width - crop + 1, (batch_size,), generator=generator)
    flip = torch.rand(batch_size, generator=generator) < 0.5
    out = torch.stack([images[i, :, t : t + crop, l : l + crop] for i, t, l in zip(index.tolist(), top.tolist(), left.tolist())])
    out[flip] = out[flip].flip(-1)
    return out  # (B, 3, crop, crop)


def train_demo_vae(images: torch.Tensor, *, steps: int, batch_size: int, crop: int, lr: float, kl_weight: float,
                   seed: int, progress: bool = True):
    """Train on crops of ``images`` (N, 3, R, R) in [-1, 1]; return (model, seconds)."""
    from tqdm import tqdm

    model = build_model(seed).train()
    with torch.no_grad():  # start with a near-deterministic posterior (std e^-4) so the decoder first sees signal
        model.quant_conv.weight[model.config.latent_channels:].zero_()  # rows of the log-variance half
        model.quant_conv.bias[model.config.latent_channels:].fill_(-8.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="demo VAE", disable=not progress, mininterval=2.0)
    for _ in bar:
        batch = random_crops(images, crop, batch_size, generator)  # (B, 3, c, c)
        posterior = model.encode(batch).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)
        latents = posterior.mean + posterior.std * noise  # (B, 4, c/8, c/8)
        reconstruction = model.decode(latents).sample
        mse = torch.nn.functional.mse_loss(reconstruction, batch)
        loss = mse + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{mse.item():.4f}", refresh=False)
    return model.eval(), time.perf_counter() - started


@torch.no_grad()
def latent_statistics(model, images: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """(shift, scale) with ``(mean_latent - shift) * scale`` zero-mean, unit-std over ``images``."""
    means = torch.cat([model.encode(images[i : i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)])
    return float(means.mean()), float(1.0 / means.std().clamp_min(1e-8))


def train_and_save(images: torch.Tensor, folder: str, *, progress: bool = True, **overrides) -> dict:
    """Train (or reuse a folder trained with the same settings) and write it with save_pretrained."""
    settings = dict(TRAIN_DEFAULTS, **overrides)
    record_path = os.path.join(folder, TRAIN_CONFIG_FILE)
    wanted = {"model": json.loads(json.dumps(MODEL_CONFIG)), "train": settings, "num_images": int(len(images))}
    if os.path.isfile(record_path) and os.path.isfile(os.path.join(folder, "config.json")):
        with open(record_path) as handle:
            found = json.load(handle)
        if {k: found.get(k) for k in wanted} == wanted:
            return found
    model, seconds = train_demo_vae(images, progress=progress, **settings)
    shift, scale = latent_statistics(model, images)
    model.register_to_config(scaling_factor=scale, shift_factor=shift)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    record = dict(wanted, train_seconds=round(seconds, 1), scaling_factor=scale, shift_factor=shift)
    with open(record_path + ".tmp", "w") as handle:
        json.dump(record, handle, indent=1)
    os.replace(record_path + ".tmp", record_path)
    return record
