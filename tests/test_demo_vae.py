"""The demo's trained AutoencoderKL goes through data_pipeline.vae exactly as a diffusers hub VAE would."""

import json
import os

import pytest
import torch

from data_pipeline import demo_vae
from data_pipeline.demo_data import available_photos, build_demo_data
from data_pipeline.images import center_crop_arr, load_rgb, uint8_to_model
from data_pipeline.loader import LatentLoader
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
    first = demo_vae.train_and_save(images, str(tmp_path / "a"), progress=False, **FEW_STEPS)
    second = demo_vae.train_and_save(images, str(tmp_path / "b"), progress=False, **FEW_STEPS)
    assert first["scaling_factor"] == second["scaling_factor"] and first["shift_factor"] == second["shift_factor"]
    weights = [open(tmp_path / name / "diffusion_pytorch_model.safetensors", "rb").read() for name in ("a", "b")]
    assert weights[0] == weights[1]
    again = demo_vae.train_and_save(images, str(tmp_path / "a"), progress=False, **FEW_STEPS)
    assert again == first  # same settings: the saved folder is reused, not retrained
    other_seed = demo_vae.train_and_save(images, str(tmp_path / "a"), progress=False, **dict(FEW_STEPS, seed=1))
    assert other_seed["scaling_factor"] != first["scaling_factor"]  # different settings: retrained
