"""Sample and export tools on a real (tiny, single-process) run directory."""
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.runs import REPO, _env, run_training


@pytest.fixture(scope="module")
def tiny_run(demo_root, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("tools"))
    run_training(1, [f"data.root={demo_root}", f"run.dir={run_dir}", "train.max_steps=3", "checkpoint.every=3"],
                 launcher="python", ds_config="zero1.json")
    return run_dir


def test_sample_tool_writes_a_class_grid(tiny_run, tmp_path):
    out = str(tmp_path / "grid.png")
    proc = subprocess.run([sys.executable, "-m", "trainer.sample", tiny_run, "--out", out, "--classes", "0", "3", "5",
                           "--per-class", "2", "--steps", "4", "--cfg-scale", "1.5", "--seed", "1"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == out  # the path alone on its line, for scripts
    spread = re.search(r"sampled latents: std ([0-9.]+), \|max\| ([0-9.]+)", proc.stderr)
    assert spread and 0 < float(spread[1]) < float(spread[2]), proc.stderr
    grid = Image.open(out)
    # 3 rows (classes) × 2 columns of 64-px images with 2-px padding.
    assert grid.size == (2 * 64 + 3 * 2, 3 * 64 + 4 * 2)


def test_sample_tool_rejects_a_directory_without_checkpoints(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.sample", str(tmp_path)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr


def test_export_official_loads_strictly_and_matches_ema(tiny_run, tmp_path):
    from trainer.state.consolidate import load_ema_model, resolve_checkpoint
    from trainer.tools.export import export_official

    ck = resolve_checkpoint(tiny_run)
    assert ck.endswith("step00000003")
    out = export_official(ck, str(tmp_path / "ema.pt"))
    state = torch.load(out, map_location="cpu", weights_only=True)
    reference, arch = load_ema_model(ck)
    model = arch.build()
    model.load_state_dict(state, strict=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    model.eval()
    torch.testing.assert_close(model(x, t, y), reference(x, t, y))
    assert set(state) == set(reference.state_dict())
