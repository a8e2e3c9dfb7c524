"""In-training FID of the EMA (issue #18, ``log.eval_every``): recorded like trainer.evaluate, reproduced by it,
independent of the layout, honest about its feature extractor and reference, and loud when the extractor fails.

Real Inception weights cannot be downloaded here: a small scripted convolutional network stands in (16-d features,
named ``tiny-conv``, so its distance is ``fd_tiny_conv``, never ``fid``).

Runs (CPU, gloo, tiny model on the demo shards, 4 steps, evaluation every 2 steps, 4 EMA samples per class = 32):
  z2   2 ranks, ZeRO-2 (W&B offline)
  z3   2 ranks, ZeRO-3 (the EMA is partitioned: gathered, broadcast, sampled on every rank)
  tp2  2 ranks, tensor parallel 2, validation loss on as well (TP validation, issue #18 item 2)
and, for the validation loss under the remaining layouts and the flow objective on several ranks: a 1-rank ZeRO-1
run against tp2, and a flow-objective MoE model on expert-parallel 1 and 2.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.runs import REPO, read_metrics, run_training
from trainer.rundir import is_val_record

PER_CLASS = 4


class TinyConvFeatures(torch.nn.Module):
    """uint8 NCHW images -> 16-d features (a stand-in with the calling convention of NVIDIA's Inception file)."""

    def __init__(self, fail: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(8, 3, 4, 4, generator=gen) * 0.3)
        self.proj = torch.nn.Parameter(torch.randn(32, 16, generator=gen) * 0.3)
        self.fail = fail

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("feature extractor failed inside the network")
        h = torch.relu(torch.nn.functional.conv2d(x.float() / 127.5 - 1.0, self.weight, stride=4))
        h = torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)  # (N, 32)
        return h @ self.proj  # (N, 16)


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    base = tmp_path_factory.mktemp("extractors")
    good, broken = str(base / "tiny-conv.pt"), str(base / "tiny-conv-broken.pt")
    torch.jit.script(TinyConvFeatures()).save(good)
    torch.jit.script(TinyConvFeatures(fail=True)).save(broken)
    return good, broken


def _over(root, run_dir, extractor, *extra):
    return [f"data.root={root}", f"run.dir={run_dir}", "train.max_steps=4", "train.global_batch=8",
            "train.micro_batch=4", "log.every=1", "checkpoint.every=2", "checkpoint.keep_last=5",
            "log.eval_every=2", f"log.eval_per_class={PER_CLASS}", "log.eval_batch=12", f"log.eval_extractor={extractor}",
            "sample.steps=4", "sample.cfg_scale=1.5", "sample.seed=7", *extra]


def _evals(run_dir) -> dict:
    with open(os.path.join(run_dir, "evals.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r.get("source") == "training"}


@pytest.fixture(scope="module")
def eval_runs(demo_root, extractors, tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_runs")
    runs = {n: str(base / n) for n in ("z2", "z3", "tp2")}
    good, _ = extractors
    run_training(2, _over(demo_root, runs["z2"], good, "log.wandb.mode=offline", "log.wandb.project=dit-tests"))
    run_training(2, _over(demo_root, runs["z3"], good), ds_config="zero3.json")
    run_training(2, _over(demo_root, runs["tp2"], good, "parallel.tensor=2", "log.val_every=2", "log.val_samples=32"),
                 ds_config="zero1.json")
    return runs


def test_in_training_fid_is_recorded_with_its_extractor_and_reference(eval_runs, extractors):
    records = _evals(eval_runs["z2"])
    assert sorted(records) == [2, 4]
    for step, r in records.items():
        assert "fid" not in r and np.isfinite(r["fd_tiny_conv"]) and r["fd_tiny_conv"] > 0
        assert r["num_samples"] == 8 * PER_CLASS and r["world_size"] == 2 and r["seed"] == 7
        fe = r["feature_extractor"]
        assert fe["name"] == "tiny-conv" and fe["dim"] == 16 and fe["file"] == os.path.abspath(extractors[0])
        ref = r["reference"]
        assert ref["kind"] == "held-out latents decoded by the shard set's VAE" and ref["num_samples"] == 32
        assert ref["shards"].endswith(os.path.join("val", "64")) and os.path.isfile(ref["statistics"])
    assert records[2]["fd_tiny_conv"] != records[4]["fd_tiny_conv"]  # the EMA moved: the samples did


def test_trainer_evaluate_on_the_checkpoint_reproduces_the_in_training_number(eval_runs, extractors):
    """The same samples (noise keyed by (seed, i)), one process instead of two ranks, against the cached reference."""
    run = eval_runs["z2"]
    r = _evals(run)[4]
    out = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", os.path.join(run, "checkpoints", "step00000004"),
         "--per-class", str(PER_CLASS), "--seed", "7", "--inception", extractors[0], "--extractor-name", "tiny-conv",
         "--ref", r["reference"]["statistics"], "--no-record", "--batch-size", "5", "--out", os.path.join(run, "offline")],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    offline = json.loads(out.stdout.strip().splitlines()[-1])
    assert offline["num_samples"] == r["num_samples"] and offline["sampling_steps"] == r["sampling_steps"] == 4
    assert offline["fd_tiny_conv"] == pytest.approx(r["fd_tiny_conv"], rel=1e-4)


def test_in_training_fid_does_not_depend_on_the_layout(eval_runs):
    z2, z3, tp2 = (_evals(eval_runs[n]) for n in ("z2", "z3", "tp2"))
    for step in (2, 4):  # ZeRO-2 / ZeRO-3 / TP2 train the same run to fp32 reduction order
        assert z3[step]["fd_tiny_conv"] == pytest.approx(z2[step]["fd_tiny_conv"], rel=1e-3)
        assert tp2[step]["fd_tiny_conv"] == pytest.approx(z2[step]["fd_tiny_conv"], rel=1e-3)


def test_tensor_parallel_validation_loss_equals_the_data_parallel_one(eval_runs, demo_root, tmp_path):
    """TP2 validation (each tensor-parallel pair evaluates the same samples) = the 1-rank validation of the same run."""
    run_training(1, [f"data.root={demo_root}", f"run.dir={tmp_path / 'dp1'}", "train.max_steps=4",
                     "train.global_batch=8", "train.micro_batch=4", "log.every=1", "log.val_every=2",
                     "log.val_samples=32"], launcher="python", ds_config="zero1.json")
    tp = {r["step"]: r for r in read_metrics(eval_runs["tp2"]) if is_val_record(r)}
    dp = {r["step"]: r for r in read_metrics(str(tmp_path / "dp1")) if is_val_record(r)}
    assert sorted(tp) == sorted(dp) == [0, 2, 4]
    assert tp[0]["val/loss"] == pytest.approx(dp[0]["val/loss"], rel=1e-6)  # the same initial weights
    for step in (0, 2, 4):
        for key in ("val/loss", "val/ema_loss", "val/loss_t0", "val/loss_t7"):
            assert tp[step][key] == pytest.approx(dp[step][key], rel=1e-4), (step, key)


def test_status_and_wandb_show_the_in_training_distance(eval_runs):
    run = eval_runs["z2"]
    out = subprocess.run([sys.executable, "-m", "trainer.status", run, "--json"], cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fd_tiny_conv" in out.stdout
    import glob

    from trainer.monitor.wandb_sink import read_run_records

    files = sorted(glob.glob(os.path.join(run, "wandb", "offline-run-*", "run-*.wandb")))
    assert files, "no offline W&B run"
    rows = [row for row in read_run_records(files[0])["history"] if "eval/fd_tiny_conv" in row]
    by_step = {row["eval/step"]: row["eval/fd_tiny_conv"] for row in rows}
    records = _evals(run)
    assert by_step == pytest.approx({s: records[s]["fd_tiny_conv"] for s in (2, 4)})


def test_an_error_inside_the_feature_extractor_stops_the_run(demo_root, extractors, tmp_path):
    proc = run_training(1, _over(demo_root, str(tmp_path / "run"), extractors[1], "train.max_steps=2"),
                        launcher="python", check=False)
    assert proc.returncode != 0
    assert "feature extractor failed inside the network" in proc.stdout + proc.stderr
    assert not os.path.exists(tmp_path / "run" / "evals.jsonl")


def test_config_refuses_an_evaluation_without_extractor_or_reference(demo_root, extractors, tmp_path):
    from trainer.config.ds_json import load_ds_config
    from trainer.config.schema import ConfigError, load_config
    from trainer.config.validate import validate_run

    def check(*over):
        cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                          [f"data.root={demo_root}", f"run.dir={tmp_path / 'run'}", "log.eval_every=10", *over])
        return validate_run(cfg, load_ds_config("zero1"), 1)

    with pytest.raises(ConfigError, match="log.eval_every=10 needs log.eval_extractor"):
        check()
    with pytest.raises(ConfigError, match="log.eval_extractor: no such file /nope.pt"):
        check("log.eval_extractor=/nope.pt")
    with pytest.raises(ConfigError, match="log.eval_ref: no such file /nope.npz"):
        check(f"log.eval_extractor={extractors[0]}", "log.eval_ref=/nope.npz")
    check(f"log.eval_extractor={extractors[0]}")  # the recorded held-out set is the reference


def test_flow_validation_with_experts_is_the_same_on_ep1_and_ep2(demo_root, tmp_path):
    """The rectified-flow objective on 2 ranks, with an MoE model on expert-parallel 1 and 2: the velocity-MSE
    validation of the same weights is the same number (step 0), and the runs stay together (fp32 reduction order)."""
    moe = ["objective.kind=flow", "sample.method=euler", "model.moe.num_experts=4", "model.moe.top_k=2",
           "model.moe.capacity_factor=1.25", "log.val_every=2", "log.val_samples=32"]
    base = [f"data.root={demo_root}", "train.max_steps=4", "train.global_batch=8", "train.micro_batch=4", "log.every=1"]
    run_training(2, base + moe + [f"run.dir={tmp_path / 'ep1'}"], ds_config="zero1.json")
    run_training(2, base + moe + [f"run.dir={tmp_path / 'ep2'}", "parallel.expert=2"], ds_config="zero2.json")
    ep1, ep2 = ({r["step"]: r for r in read_metrics(str(tmp_path / n)) if is_val_record(r)} for n in ("ep1", "ep2"))
    assert sorted(ep1) == sorted(ep2) == [0, 2, 4]
    assert ep1[0]["val/timesteps"] == pytest.approx([(k + 0.5) / 8 for k in range(8)])  # flow: t in (0, 1)
    assert ep2[0]["val/loss"] == pytest.approx(ep1[0]["val/loss"], rel=1e-6)
    for step in (2, 4):
        for key in ("val/loss", "val/ema_loss", "val/loss_t0", "val/ema_loss_t7"):
            assert ep2[step][key] == pytest.approx(ep1[step][key], rel=1e-4), (step, key)
    assert ep1[4]["val/loss"] < ep1[0]["val/loss"]
