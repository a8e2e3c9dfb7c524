"""Progressive resolution: two stages (latent 8×8 → 16×16) on 2 CPU ranks, boundary, resume, validation."""
import os
import subprocess
import sys

import pytest
import torch

from tests.runs import REPO, _env, losses_by_step, read_metrics, run_training, start_and_kill_after_checkpoint

CONFIG = "configs/tiny_progressive.yaml"


def _over(demo_root, run_dir, *extra):
    return [f"data.root={demo_root}", f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def progressive_run(demo_root, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("prog"))
    run_training(2, _over(demo_root, run_dir), config=CONFIG, ds_config="zero2.json")
    return run_dir


def _module_pos_embed(ckpt):
    states = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return states["module"]["pos_embed"]


def test_two_stages_cross_the_boundary(progressive_run):
    records = read_metrics(progressive_run)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [(r["resolution"], r["tokens"], r["stage"]) for r in records[:6]] == [(64, 16, 0)] * 6
    assert [(r["resolution"], r["tokens"], r["stage"]) for r in records[6:]] == [(128, 64, 1)] * 6
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in records)  # finite
    # Stage 2 restarts its lr schedule: warmup 2 steps up to its own lr 5e-4.
    assert [r["lr"] for r in records[6:9]] == pytest.approx([2.5e-4, 5e-4, 5e-4])
    ck = os.path.join(progressive_run, "checkpoints")
    # A checkpoint at the stage boundary (step 6) holds the 4×4 table, the final one the 8×8 table.
    assert tuple(_module_pos_embed(os.path.join(ck, "step00000006")).shape) == (1, 16, 64)
    final_table = _module_pos_embed(os.path.join(ck, "step00000012"))
    assert tuple(final_table.shape) == (1, 64, 64)
    from models.pos_embed import sincos_2d

    torch.testing.assert_close(final_table[0], sincos_2d(64, 8, 8).float())
    assert os.path.exists(os.path.join(progressive_run, "samples", "final.png"))


def test_grid_sampled_across_ranks_equals_one_process_sampling(progressive_run, tmp_path):
    """The final grid was sampled by both ranks, each its share of the rows, and assembled on rank 0: it must show
    the same samples in the same places as ``trainer.sample`` drawing every row in one process from the same
    checkpoint's EMA (float differences from other batch shapes allowed: a pixel level or two)."""
    import numpy as np
    from PIL import Image

    out = str(tmp_path / "one_process.png")
    proc = subprocess.run([sys.executable, "-m", "trainer.sample", progressive_run, "--out", out], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    split = np.asarray(Image.open(os.path.join(progressive_run, "samples", "final.png")), dtype=np.int16)
    whole = np.asarray(Image.open(out), dtype=np.int16)  # (rows·(128+2)+2, 128+4, 3): one sample per class
    assert split.shape == whole.shape
    difference = np.abs(split - whole)
    assert difference.max() <= 3 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_pe_interpolated_model_is_rebuilt_with_the_positions_it_trained_with(demo_root, tmp_path):
    """With pe_interpolation the trained model's stage-2 table has coordinates scaled to stage 1's 4×4 grid; every
    tool that rebuilds the model from the checkpoint (grids, FID, trainer.sample, export) must get the same table,
    not the 8×8 token-index one (which put the 64 px layout into the top-left quarter of every 128 px sample)."""
    from models.pos_embed import sincos_2d
    from trainer.state.checkpoint import check_model_config
    from trainer.state.consolidate import checkpoint_args, load_ema_model

    run_dir = str(tmp_path / "pe")
    run_training(1, _over(demo_root, run_dir, "pe_interpolation=true"), config=CONFIG,
                 ds_config="zero2.json", launcher="python")
    final = os.path.join(run_dir, "checkpoints", "step00000012")
    trained = _module_pos_embed(final)  # (1, 64, 64)
    torch.testing.assert_close(trained[0], sincos_2d(64, 8, 8, base_size=4).float())
    assert not torch.allclose(trained[0], sincos_2d(64, 8, 8).float())  # the scaling is not a no-op here
    rebuilt, arch = load_ema_model(final, input_size=16)  # stage 2: latent 16×16, 8×8 tokens
    assert arch.pe_base_size == 8  # the first stage's latent side (4×4 tokens of patch 2)
    torch.testing.assert_close(rebuilt.pos_embed, trained)
    # a checkpoint written before the record held pe_base_size still resumes under pe_interpolation
    old_record = {k: v for k, v in checkpoint_args(final).to_dict().items() if k != "pe_base_size"}
    check_model_config(old_record, arch)


def test_killed_in_stage_two_resumes_exactly(demo_root, progressive_run, tmp_path):
    run_dir = str(tmp_path / "killed")
    over = _over(demo_root, run_dir, "checkpoint.every=4")
    start_and_kill_after_checkpoint(2, over, run_dir, 8, config=CONFIG, ds_config="zero2.json")  # inside stage 2
    assert max(losses_by_step(run_dir)) == 8
    run_training(2, over, config=CONFIG, ds_config="zero2.json")
    ref, got = losses_by_step(progressive_run), losses_by_step(run_dir)
    for step in range(9, 13):
        assert got[step] == pytest.approx(ref[step], rel=1e-9), f"step {step}"


def test_stage_with_missing_shards_is_rejected_before_training(demo_root, tmp_path):
    proc = subprocess.run(
        [sys.executable, "trainer/main.py", "--config", CONFIG, f"data.root={demo_root}", f"run.dir={tmp_path}/r",
         "stages=[{resolution: 64, steps: 2}, {resolution: 256, steps: 2}]"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{demo_root}/256" in proc.stderr and "resolution 256" in proc.stderr
    assert not os.path.exists(f"{tmp_path}/r/checkpoints")
