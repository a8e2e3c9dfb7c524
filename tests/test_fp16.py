"""train.precision=fp16: torch autocast over fp32 weights with dynamic loss scaling, tested for real on CPU.

torch 2.13's CPU autocast runs float16 matmuls and DeepSpeed's CPU accelerator takes the same ``torch_autocast``
section as a GPU, so the whole fp16 path (scaled loss, ZeRO's norm / clipping / unscale, overflow skip, scale
update, checkpointed scale) runs here as it would on CUDA; only the speed differs.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.runs import REPO, read_metrics, run_training


def _worker(ds_config: str, tmp_path) -> dict:
    out = tmp_path / "fp16.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "fp16_check.py"), "--ds-config", ds_config,
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_fp16_under_zero_matches_fp32_clips_correctly_and_skips_overflows(ds_config, tmp_path):
    r = _worker(ds_config, tmp_path)
    fp32, fp16, shipped = r["fp32"], r["fp16"], r["shipped"]
    for a, b in zip(fp32[:3], fp16[:3]):  # before the overflow: the same training up to fp16 rounding
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-3)  # unscaled norm (clip 0.3 < norm: active)
        assert b["update"] == pytest.approx(a["update"], rel=2e-3)
        assert a["grad_norm"] > 0.3
    # DeepSpeed's own GradScaler path (what the trainer replaces): the norm is the scaled one and clipping
    # shrinks the update by the scale; kept as evidence of why trainer/engine/loss_scale.py exists
    assert shipped[0]["grad_norm"] > 1000 * fp32[0]["grad_norm"]
    assert shipped[2]["update"] < 0.5 * fp32[2]["update"]
    # two overflows: both steps skipped (weights untouched); hysteresis 2 -> the second halves the scale
    assert [s["applied"] for s in fp16] == [True, True, True, False, False, True]
    assert fp16[3]["update"] == 0.0 and fp16[4]["update"] == 0.0
    assert [s["loss_scale"] for s in fp16] == [65536.0] * 4 + [32768.0] * 2
    assert [s["overflow_steps"] for s in fp16] == [0, 0, 0, 1, 2, 2]
    assert fp16[5]["grad_norm"] == pytest.approx(fp32[5]["grad_norm"], rel=0.2)  # training goes on normally
    # the scale and the overflow count travel with the checkpoint
    assert r["resume"]["fresh"] == {"loss_scale": 65536.0, "overflow_steps": 0}
    assert r["resume"]["loaded"] == r["resume"]["saved"] == {"loss_scale": 32768.0, "overflow_steps": 2}
    assert r["resume"]["steps"][0]["loss"] == pytest.approx(fp16[5]["loss"], rel=1e-5)


def test_trainer_runs_fp16_and_logs_the_loss_scale(demo_root, tmp_path):
    run_dir = str(tmp_path / "fp16")
    run_training(1, [f"data.root={demo_root}", f"run.dir={run_dir}", "train.max_steps=3", "log.every=1",
                     "train.precision=fp16", "checkpoint.every=100"], ds_config="zero2.json", launcher="python",
                 timeout=300)
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["loss"] == r["loss"] and r["loss"] < 10  # finite
        assert r["loss_scale"] == 65536.0 and r["overflow_skipped"] == 0 and r["overflow_skipped_steps"] == 0
    with open(os.path.join(run_dir, "ds_config.json")) as f:
        assert json.load(f)["torch_autocast"] == {"enabled": True, "dtype": "float16"}
