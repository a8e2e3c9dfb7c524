"""The demo's trained AutoencoderKL goes through data_pipeline.vae exactly as a diffusers hub VAE would."""

import json
import os

import pytest
import torch

from data_pipeline import demo_vae
from data_pipeline.demo_data import available_photos, build_demo_data
from data_pipeline.images import center_crop_arr, load_rgb, psnr, uint8_to_model
from data_pipeline.loader import LatentLoader
from data_pipeline.pca_autoencoder import PatchPCAAutoencoder
from data_pipeline.vae import DiffusersVAE, load_vae_from_manifest

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
    blurred image rather than a texture of blobs; clean reconstructions stay as good (demo: 23.2 vs 23.0 dB)."""
    images = photos(64)  # (8, 3, 64, 64)
    teacher = PatchPCAAutoencoder.fit([images])
    settings = dict(demo_vae.TRAIN_DEFAULTS, steps=200, batch_size=8)

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
    assert drop_noised < 0.6 * drop_plain, (drop_noised, drop_plain)
    assert psnr_at(noised, 0.0) > psnr_at(plain, 0.0) - 1.0
