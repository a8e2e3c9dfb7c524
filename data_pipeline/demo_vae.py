"""A small real diffusers AutoencoderKL, trained in a few minutes on the demo photos' crops.

Why: the patch-PCA encoder is linear per 8x8 block and clips, so decoded demo samples are mosaics with
seams. A convolutional VAE with SD-VAE's shape (8x downsampling, 4 latent channels) but few channels
learns overlapping, non-linear decoders: held-out crops decode with pixel steps across the 8-pixel block lines
1.05x those elsewhere, vs 5.0x for the patch-PCA (``benchmarks/bench_demo_vae.py``). It is saved with
``save_pretrained`` so the demo's encode, sample and report paths load it exactly as they load a hub VAE
(``data_pipeline.vae.DiffusersVAE``), with ``scaling_factor``/``shift_factor`` computed from its own
encoded latents the way SD's 0.18215 (1 / std) and SD3's shift (mean) were.

Why a distillation warm start: trained jointly from scratch, the autoencoder needs ~1800 steps just to match
the patch-PCA (21.4 / 22.0 dB vs 20.7 / 22.1 dB held-out at 64 / 128 px); first regressing the encoder onto the
PCA's latents and teaching the decoder to decode them (two problems with fixed targets) for 30 % of the steps
reaches 22.2 / 23.0 dB in the same 1800 steps (``python benchmarks/bench_demo_vae.py``).

Why latent noise (``latent_noise``): the decoder also learns to decode latents with added Gaussian noise (a
per-crop level uniform in [0, 0.3] x the latents' std), as a diffusion sampler's imperfect latents are. Without it
the decoder turns small latent errors into a cellular texture of dark and white blobs, which is what the demo's
samples showed; with it, held-out PSNR under 0.4-std latent noise rises from 19.3 / 20.0 to 20.7 / 21.7 dB at
64 / 128 px while clean PSNR does not fall (``python benchmarks/bench_demo_vae.py [--latent-noise 0]``).

Training is deterministic given the seed: fixed step count, seeded crop positions and posterior noise,
one thread-count-independent data order (the float results may still differ across CPU types).
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
# a few minutes of 2-core CPU training reach a useful fit; (8, 16, 32, 64) beat (16, 32, 64, 64) at equal time
# (more, cheaper steps: the full-resolution level dominates the cost).
# One normalisation group: with few channels, several groups normalise away each image's colour balance at full
# resolution (4 groups vs 1 on channels (8,16,32,64): 19.6 / 20.2 dB vs 20.3 / 21.7 held-out at 64 / 128 px).
MODEL_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=1,
    block_out_channels=(8, 16, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    mid_block_add_attention=False,
)
TRAIN_DEFAULTS = dict(steps=1800, batch_size=16, crop=32, lr=2e-3, kl_weight=1e-6, distill=0.3, latent_noise=0.3,
                      seed=0)


def build_model(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**MODEL_CONFIG)


def random_crops(image_sets, crop: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """[(N, 3, R, R), ...] -> (B, 3, crop, crop): an equal share from each set; seeded image, position and flip.

    Why several sets: the demo encodes at 64 and 128 px, and a 32 px crop of a 64 px image holds coarser detail
    than one of a 128 px image; training on both keeps either resolution from being out of distribution.
    """
    out = []
    for k, images in enumerate(image_sets):
        share = batch_size // len(image_sets) + (k < batch_size % len(image_sets))
        n, _, height, width = images.shape
        index = torch.randint(0, n, (share,), generator=generator)
        top = torch.randint(0, height - crop + 1, (share,), generator=generator)
        left = torch.randint(0, width - crop + 1, (share,), generator=generator)
        flip = (torch.rand(share, generator=generator) < 0.5).tolist()
        for i, t, l, f in zip(index.tolist(), top.tolist(), left.tolist(), flip):
            patch = images[i, :, t : t + crop, l : l + crop]
            out.append(patch.flip(-1) if f else patch)
    return torch.stack(out).contiguous(memory_format=torch.channels_last)  # (B, 3, crop, crop)


def train_demo_vae(image_sets, *, steps: int, batch_size: int, crop: int, lr: float, kl_weight: float,
                   distill: float, seed: int, latent_noise: float = 0.0, teacher=None, progress: bool = True):
    """Train on crops of ``image_sets`` ([(N, 3, R, R), ...] in [-1, 1]); return (model, seconds).

    ``distill`` > 0 (needs ``teacher``, a fitted PatchPCAAutoencoder): for that fraction of the steps the encoder
    regresses the teacher's latents and the decoder learns to decode them (two supervised problems with fixed
    targets), before the joint reconstruction training takes over.
    ``latent_noise`` > 0: the decoder also decodes latents with added Gaussian noise, a per-crop level drawn
    uniformly from [0, latent_noise] x the batch's latent std.
    """
    from tqdm import tqdm

    if distill > 0 and teacher is None:
        raise ValueError("distill > 0 needs a teacher (a fitted PatchPCAAutoencoder)")
    image_sets = [image_sets] if torch.is_tensor(image_sets) else list(image_sets)
    model = build_model(seed).train().to(memory_format=torch.channels_last)
    with torch.no_grad():  # start with a near-deterministic posterior (std e^-4) so the decoder first sees signal
        model.quant_conv.weight[model.config.latent_channels:].zero_()  # rows of the log-variance half
        model.quant_conv.bias[model.config.latent_channels:].fill_(-8.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99), foreach=True)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    generator = torch.Generator().manual_seed(seed)
    distill_steps = int(round(distill * steps))
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="demo VAE", disable=not progress, mininterval=2.0)
    for step in bar:
        batch = random_crops(image_sets, crop, batch_size, generator)  # (B, 3, c, c)
        posterior = model.encode(batch).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)  # every step: crops do not depend on `distill`
        if step < distill_steps:  # decode the teacher's latents; pull the encoder's mean onto them
            with torch.no_grad():
                latents = teacher.encode(batch)  # (B, 4, c/8, c/8)
            encoder_loss = torch.nn.functional.mse_loss(posterior.mean, latents)
        else:  # decode a posterior sample; the KL term keeps the posterior near N(0, 1)
            latents = posterior.mean + posterior.std * noise  # (B, 4, c/8, c/8)
            encoder_loss = kl_weight * posterior.kl().mean()
        if latent_noise > 0:  # the decoder also sees noisier latents, as a sampler's imperfect ones are
            level = latent_noise * torch.rand(len(batch), 1, 1, 1, generator=generator)  # (B, 1, 1, 1)
            scale = latents.detach().std()
            latents = latents + level * scale * torch.randn(latents.shape, generator=generator)
        reconstruction = model.decode(latents).sample  # (B, 3, c, c)
        mse = torch.nn.functional.mse_loss(reconstruction, batch)
        loss = mse + encoder_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{mse.item():.4f}", refresh=False)
    return model.eval(), time.perf_counter() - started


@torch.no_grad()
def latent_statistics(model, image_sets, batch_size: int = 64) -> tuple[float, float]:
    """(shift, scale) with ``(mean_latent - shift) * scale`` zero-mean, unit-std over every image of ``image_sets``."""
    means = [model.encode(images[i : i + batch_size]).latent_dist.mean.flatten()
             for images in image_sets for i in range(0, len(images), batch_size)]
    means = torch.cat(means)
    return float(means.mean()), float(1.0 / means.std().clamp_min(1e-8))


def train_and_save(image_sets, folder: str, *, teacher=None, progress: bool = True, **overrides) -> dict:
    """Train (or reuse a folder trained with the same settings) and write it with save_pretrained.

    ``image_sets``: one (N, 3, R, R) tensor or a list of them (the demo: its training crops at 64 and 128 px);
    ``teacher``: the PatchPCAAutoencoder fitted on the same crops, needed when ``distill`` > 0.
    """
    image_sets = [image_sets] if torch.is_tensor(image_sets) else list(image_sets)
    settings = dict(TRAIN_DEFAULTS, **overrides)
    record_path = os.path.join(folder, TRAIN_CONFIG_FILE)
    wanted = {"model": json.loads(json.dumps(MODEL_CONFIG)), "train": settings,
              "images": [list(images.shape) for images in image_sets]}
    if os.path.isfile(record_path) and os.path.isfile(os.path.join(folder, "config.json")):
        with open(record_path) as handle:
            found = json.load(handle)
        if {k: found.get(k) for k in wanted} == wanted:
            return found
    model, seconds = train_demo_vae(image_sets, teacher=teacher, progress=progress, **settings)
    shift, scale = latent_statistics(model, image_sets)
    model.register_to_config(scaling_factor=scale, shift_factor=shift)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    record = dict(wanted, train_seconds=round(seconds, 1), scaling_factor=scale, shift_factor=shift)
    with open(record_path + ".tmp", "w") as handle:
        json.dump(record, handle, indent=1)
    os.replace(record_path + ".tmp", record_path)
    return record
