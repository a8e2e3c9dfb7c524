"""The demo's trained AutoencoderKL goes through data_pipeline.vae exactly as a diffusers hub VAE would."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from data_pipeline import demo_vae
from data_pipeline.demo_data import available_photos, build_demo_data
from data_pipeline.images import (block_seam_ratios, center_crop_arr, load_rgb, model_to_uint8, periodic_texture_ratios,
                                  psnr, read_image_grid, save_image_grid, uint8_to_model)
from data_pipeline.loader import LatentLoader
from data_pipeline.pca_autoencoder import PatchPCAAutoencoder
from data_pipeline.vae import DiffusersVAE, load_vae, load_vae_from_manifest

FEW_STEPS = dict(steps=3, batch_size=4)  # seconds, not minutes: the maths under test does not need a good fit


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo-vae"))
    build_demo_data(root, (64,), samples_per_class=4, seed=0, fit_images=32, val_fraction=None, vae="trained",
                    vae_train=FEW_STEPS)
    return root


def photos(resolution):
    return uint8_to_model([center_crop_arr(load_rgb(path), resolution) for _, path in available_photos()])  # (8, 3, R, R)


def test_manifest_records_the_trained_vae_like_a_hub_vae(trained_demo):
    folder = os.path.join(trained_demo, demo_vae.DEMO_VAE_DIR)
    manifest = json.load(open(os.path.join(trained_demo, "64", "manifest.json")))
    config = json.load(open(os.path.join(folder, "config.json")))
    assert manifest["vae"]["type"] == "diffusers"
    assert manifest["vae"]["name_or_path"] == os.path.abspath(folder)
    assert (manifest["vae"]["latent_channels"], manifest["vae"]["downsample"]) == (4, 8)
    assert manifest["scaling_factor"] == pytest.approx(config["scaling_factor"])
    assert manifest["shift_factor"] == pytest.approx(config["shift_factor"])
    assert manifest["latent_shape"] == [4, 8, 8]
    # scale and shift come from this VAE's own latents: the shards hold ~zero-mean, unit-std latents
    latents = torch.cat([x for x, _ in LatentLoader(os.path.join(trained_demo, "64"), batch_size=8, seed=0, resampled=False)])
    assert abs(latents.float().mean().item()) < 0.3 and 0.6 < latents.float().std().item() < 1.5


def test_round_trip_through_adapter_equals_diffusers_maths(trained_demo):
    from diffusers import AutoencoderKL

    adapter = load_vae_from_manifest(os.path.join(trained_demo, "64"))
    assert isinstance(adapter, DiffusersVAE)
    direct = AutoencoderKL.from_pretrained(os.path.join(trained_demo, demo_vae.DEMO_VAE_DIR)).eval()
    scale, shift = direct.config.scaling_factor, direct.config.shift_factor
    images = photos(64)  # (8, 3, 64, 64)
    latents = adapter.encode(images)  # (8, 4, 8, 8)
    with torch.no_grad():
        expected = (direct.encode(images).latent_dist.mean - shift) * scale
        torch.testing.assert_close(latents, expected)
        decoded = direct.decode(latents / scale + shift).sample.clamp(-1, 1)
    torch.testing.assert_close(adapter.decode(latents), decoded)


def test_training_is_deterministic_and_cached(tmp_path):
    images = photos(64)
    teacher = PatchPCAAutoencoder.fit([images])
    first = demo_vae.train_and_save(images, str(tmp_path / "a"), teacher=teacher, progress=False, **FEW_STEPS)
    second = demo_vae.train_and_save(images, str(tmp_path / "b"), teacher=teacher, progress=False, **FEW_STEPS)
    assert first["scaling_factor"] == second["scaling_factor"] and first["shift_factor"] == second["shift_factor"]
    weights = [open(tmp_path / name / "diffusion_pytorch_model.safetensors", "rb").read() for name in ("a", "b")]
    assert weights[0] == weights[1]
    again = demo_vae.train_and_save(images, str(tmp_path / "a"), teacher=teacher, progress=False, **FEW_STEPS)
    assert again == first  # same settings: the saved folder is reused, not retrained
    other_seed = demo_vae.train_and_save(images, str(tmp_path / "a"), teacher=teacher, progress=False, **dict(FEW_STEPS, seed=1))
    assert other_seed["scaling_factor"] != first["scaling_factor"]  # different settings: retrained


def test_batches_mix_every_resolution_equally():
    """The demo trains on 64 and 128 px crops alike: a batch holds an equal share of each image set."""
    sets = [torch.full((5, 3, 64, 64), 1.0), torch.full((5, 3, 128, 128), -1.0)]
    batch = demo_vae.random_crops(sets, 32, 16, torch.Generator().manual_seed(0))  # (16, 3, 32, 32)
    assert batch.shape == (16, 3, 32, 32)
    assert (batch[:, 0, 0, 0] == 1.0).sum() == 8 and (batch[:, 0, 0, 0] == -1.0).sum() == 8


def test_distillation_warm_start_moves_the_encoder_to_the_teachers_latents():
    """distill > 0: the encoder first regresses the patch-PCA's latents; without a teacher it is refused."""
    images = photos(64)
    teacher = PatchPCAAutoencoder.fit([images])
    with pytest.raises(ValueError, match="teacher"):
        demo_vae.train_demo_vae(images, progress=False, **dict(demo_vae.TRAIN_DEFAULTS, steps=2, distill=0.5))

    def gap(model):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model.encode(images).latent_dist.mean, teacher.encode(images)).item()

    untrained = gap(demo_vae.build_model(0).eval())  # ≈ 1.07
    settings = dict(demo_vae.TRAIN_DEFAULTS, steps=100, batch_size=8)
    distilled, _ = demo_vae.train_demo_vae(images, teacher=teacher, progress=False, **dict(settings, distill=1.0))
    joint, _ = demo_vae.train_demo_vae(images, progress=False, **dict(settings, distill=0.0))
    assert gap(distilled) < 0.5 * untrained  # measured 0.38
    assert gap(distilled) < 0.25 * gap(joint)  # joint training finds latents of its own (measured 5.2)


def test_latent_noise_makes_the_decoder_robust_to_imperfect_latents():
    """latent_noise > 0: the decoder also learns from noised latents, so a sampler's imperfect latents decode to a
    smoother image rather than a texture of blobs, while clean reconstructions stay as good. 400 steps: at 200 both
    decoders are still too coarse (≈ 16.8 dB) for noise to matter."""
    images = photos(64)  # (8, 3, 64, 64)
    teacher = PatchPCAAutoencoder.fit([images])
    settings = dict(demo_vae.TRAIN_DEFAULTS, steps=400, batch_size=8)

    def psnr_at(model, level):
        with torch.no_grad():
            latents = model.encode(images).latent_dist.mean  # (8, 4, 8, 8)
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
            decoded = model.decode(latents + level * latents.std() * noise).sample
        return psnr(images, decoded)

    plain, _ = demo_vae.train_demo_vae(images, teacher=teacher, progress=False, **dict(settings, latent_noise=0.0))
    noised, _ = demo_vae.train_demo_vae(images, teacher=teacher, progress=False, **dict(settings, latent_noise=0.3))
    drop_plain = psnr_at(plain, 0.0) - psnr_at(plain, 0.4)
    drop_noised = psnr_at(noised, 0.0) - psnr_at(noised, 0.4)
    assert drop_noised < 0.7 * drop_plain, (drop_noised, drop_plain)  # measured 0.53 vs 0.97 dB
    assert psnr_at(noised, 0.0) > psnr_at(plain, 0.0) - 0.5  # measured 17.85 vs 17.36 dB


def test_block_seam_ratio_finds_the_patch_pca_seams_and_reads_grids_back(tmp_path):
    """Photos score ≈ 1; the patch-PCA's per-block decode draws seams on the 8-pixel lines (≈ 5 on the demo's
    held-out crops); a grid written by save_image_grid reads back tile for tile, and a wrong tile size is refused."""
    images = photos(128)  # (8, 3, 128, 128)
    pca = PatchPCAAutoencoder.fit([images])
    with torch.no_grad():
        decoded = pca.decode(pca.encode(images)).clamp(-1, 1)
    photo, patch_pca = block_seam_ratios(model_to_uint8(images), (8, 16)), block_seam_ratios(model_to_uint8(decoded), (8, 16))
    assert all(abs(ratio - 1.0) < 0.1 for ratio in photo.values()), photo
    assert min(patch_pca.values()) > 2.0, patch_pca  # seams on every 8-pixel line, the 16-pixel ones included
    path = save_image_grid(decoded, str(tmp_path / "grid.png"), nrow=4)
    assert np.array_equal(read_image_grid(path, 128), model_to_uint8(decoded))
    with pytest.raises(ValueError, match="grid.png.*64 px tiles"):
        read_image_grid(path, 64)


def _with_repeated_bump(images: np.ndarray, period: int, amplitude: float) -> np.ndarray:
    """``images`` (N, H, W, 3) uint8 plus a soft round bump centred in every ``period``-pixel cell (a token's blob)."""
    coords = (np.arange(images.shape[1]) % period - (period - 1) / 2) / (period / 4)
    bump = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2))  # (H, W), peak 1 in each cell's centre
    return np.clip(images + amplitude * bump[None, :, :, None], 0, 255).astype(np.uint8)


def test_periodic_texture_ratio_sees_a_blob_repeated_in_every_token_where_the_seam_ratio_does_not():
    """The sample grids' visible defect is a soft blob repeated in each 16-pixel token cell, which has no sharp step
    on the grid lines: the seam ratio stays ≈ 1 on it, the spectral ratio rises well above a photo's ≈ 1, and for the
    period that is repeated, not the other one; tiles that are not whole periods are refused."""
    images = model_to_uint8(photos(128))  # (8, 128, 128, 3)
    clean = periodic_texture_ratios(images, (8, 16))
    assert all(0.8 < ratio < 1.2 for ratio in clean.values()), clean  # measured 0.97 / 1.02
    tokens = _with_repeated_bump(images, 16, 64.0)
    assert block_seam_ratios(tokens, (8, 16))[16] < 1.1  # steps on the lines: none to see (measured 0.89)
    assert periodic_texture_ratios(tokens, (8, 16))[16] > 1.5  # measured 1.83; the demo grids' blobs: 2.0-3.2
    latents = periodic_texture_ratios(_with_repeated_bump(images, 8, 64.0), (8, 16))
    assert latents[8] > 3.0 and latents[16] < 1.2, latents  # an 8-pixel repeat is not counted as a 16-pixel one
    with pytest.raises(ValueError, match="120x120 px.*16-pixel"):
        periodic_texture_ratios(images[:, :120, :120], (8, 16))


def _vae_copy_with(trained_demo, tmp_path, **config_changes) -> str:
    folder = str(tmp_path / "vae")
    shutil.copytree(os.path.join(trained_demo, demo_vae.DEMO_VAE_DIR), folder)
    config_path = os.path.join(folder, "config.json")
    config = dict(json.load(open(config_path)), **config_changes)
    json.dump(config, open(config_path, "w"))
    return folder


def test_per_channel_latent_statistics_are_applied_as_diffusers_pipelines_apply_them(trained_demo, tmp_path):
    """A VAE config with latents_mean/latents_std (Playground v2.5's SDXL VAE, diffusers' SDXL pipelines) scales each
    channel on its own: latent = (raw - mean) · scaling_factor / std, and back; the manifest records both, and a
    folder whose statistics changed after encoding is refused instead of decoding with the wrong ones."""
    from diffusers import AutoencoderKL

    mean, std = [0.1, -0.2, 0.05, 0.0], [1.5, 0.8, 0.4, 0.25]
    folder = _vae_copy_with(trained_demo, tmp_path, latents_mean=mean, latents_std=std, scaling_factor=0.5,
                            shift_factor=None)
    adapter = DiffusersVAE(folder)
    assert (adapter.spec["latents_mean"], adapter.spec["latents_std"]) == (mean, std)
    direct = AutoencoderKL.from_pretrained(folder).eval()
    images = photos(64)  # (8, 3, 64, 64)
    channel_mean, channel_std = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    latents = adapter.encode(images)  # (8, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(latents, (direct.encode(images).latent_dist.mean - channel_mean) * 0.5 / channel_std)
        decoded = direct.decode(latents * channel_std / 0.5 + channel_mean).sample.clamp(-1, 1)
    torch.testing.assert_close(adapter.decode(latents), decoded)
    # changed after the shards were encoded: refused by name
    spec = dict(adapter.spec)
    _vae_copy_with(trained_demo, tmp_path / "changed", latents_mean=mean, latents_std=[1.0, 1.0, 1.0, 1.0],
                   scaling_factor=0.5, shift_factor=None)
    with pytest.raises(ValueError, match="latents_std is .* but the shards were encoded with"):
        load_vae(dict(spec, name_or_path=str(tmp_path / "changed" / "vae")))


@pytest.mark.parametrize("changes, message", [
    (dict(latents_mean=[0.0] * 4), "only one of latents_mean and latents_std"),
    (dict(latents_mean=[0.0] * 3, latents_std=[1.0] * 3), "3/3 values for 4 latent channels"),
    (dict(latents_mean=[0.0] * 4, latents_std=[1.0, 1.0, 0.0, 1.0]), "latents_std must be positive"),
    (dict(latents_mean=[0.0] * 4, latents_std=[1.0] * 4, shift_factor=0.1), "both latents_mean/latents_std and shift"),
])
def test_inconsistent_per_channel_statistics_are_refused(trained_demo, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        DiffusersVAE(_vae_copy_with(trained_demo, tmp_path, **changes))
