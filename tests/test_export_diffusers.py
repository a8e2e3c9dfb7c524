"""EMA checkpoint → diffusers DiTTransformer2DModel / DiTPipeline, compared with our model's outputs.

The checkpoint is written by hand in the trainer's layout (trainer_state.json, ema.pt, COMPLETE.json)
with random nonzero EMA weights, so the comparison is meaningful (DiT's zero-initialised adaLN would
make every output zero) and no training run is needed.
"""
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from models.convert import align_diffusers_timestep_embedding  # noqa: E402
from trainer.state.consolidate import load_ema_model  # noqa: E402
from trainer.tools.export import export_diffusers, main as export_main  # noqa: E402
from models.args import DiTArgs  # noqa: E402

ARCH = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2, "num_heads": 4,
        "mlp_ratio": 4.0, "class_dropout_prob": 0.1, "num_classes": 8, "learn_sigma": True, "qk_norm": None,
        "ffn": "gelu", "norm": "layernorm"}


@pytest.fixture(scope="module")
def run_with_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("export_run")
    ck = run / "checkpoints" / "step00000007"
    ck.mkdir(parents=True)
    torch.manual_seed(0)
    model = DiTArgs.from_dict(ARCH).build()
    tensors = {n: (torch.randn_like(p) * 0.1) for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"tensors": tensors}, ck / "ema.pt")
    (ck / "trainer_state.json").write_text(json.dumps({"step": 7, "model_config": ARCH}))
    files = {f: os.path.getsize(ck / f) for f in ("ema.pt", "trainer_state.json")}
    (ck / "COMPLETE.json").write_text(json.dumps({"files": files}))
    (run / "checkpoints" / "latest").write_text("step00000007\n")
    (run / "config.yaml").write_text("objective:\n  kind: diffusion\n  noise_schedule: linear\n  diffusion_steps: 1000\n")
    return str(run), str(ck)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 7, 8])


def test_exported_diffusers_transformer_equals_ours(run_with_checkpoint, tmp_path):
    from diffusers import DiTTransformer2DModel

    run, ck = run_with_checkpoint
    out = str(tmp_path / "hf")
    assert export_main([run, "--diffusers", out, "--vae", "none"]) == 0
    ours, _ = load_ema_model(ck)
    theirs = DiTTransformer2DModel.from_pretrained(os.path.join(out, "transformer")).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        a = ours(x, t, y)
        stock = theirs(x, timestep=t, class_labels=y).sample
        aligned = align_diffusers_timestep_embedding(theirs)(x, timestep=t, class_labels=y).sample
    assert a.abs().max() > 0.05
    torch.testing.assert_close(aligned, a, atol=1e-5, rtol=0)
    # Stock diffusers' timestep features (freq / (half - 1)) differ slightly, as for the hub's DiT ports.
    assert 0 < (stock - a).abs().max() < 0.5 * a.abs().max()
    meta = json.load(open(os.path.join(out, "dit_arch.json")))
    assert meta["arch"]["depth"] == 2 and "no diffusers VAE" in meta["note"]
    assert os.path.exists(os.path.join(out, "scheduler", "scheduler_config.json"))


def test_dit_pipeline_with_a_diffusers_vae_samples(run_with_checkpoint, tmp_path):
    from diffusers import AutoencoderKL, DiTPipeline

    run, ck = run_with_checkpoint
    vae_dir = str(tmp_path / "vae")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=8, sample_size=16).save_pretrained(vae_dir)
    out = str(tmp_path / "pipe")
    written = export_diffusers(ck, out, vae=vae_dir)
    assert written["pipeline"] == out
    pipe = DiTPipeline.from_pretrained(out)
    align_diffusers_timestep_embedding(pipe.transformer)
    # diffusers' DiTPipeline hard-codes the null class 1000 (ImageNet), so guidance needs 1000 classes.
    assert "null class id 1000" in written["note"]
    images = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and (images >= 0).all() and (images <= 1).all()
