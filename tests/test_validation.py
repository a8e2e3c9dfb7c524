"""Held-out validation (issue #18): the split, the validation loss, where it shows, and honest FID naming.

Training runs (CPU, gloo, at most 2 ranks), shared across the assertions:
  ref     1 rank, ZeRO-1, 4 steps, validation every 2 steps, W&B offline
  dp2     ref's step-4 checkpoint resumed in a fresh run directory on 2 ranks (universal conversion): it evaluates
          the loaded weights at step 4 -> the same numbers as ref's own step-4 evaluation (1 vs 2 ranks, resume)
  z1, z3  2 ranks, 4 steps under ZeRO-1 and ZeRO-3 from the same seed
  demo    the demo's EMA decay, 300 steps, validation every 25 (the healthy run: no alert)
  fault   weights perturbed from step 51 on (DIT_FAULT_PERTURB_WEIGHTS): the rising-validation alert
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.runs import REPO, read_metrics, resume_copy, run_training
from trainer.rundir import is_val_record

VAL_KEYS = ["val/loss", "val/ema_loss"] + [f"val/loss_t{i}" for i in range(8)] + [f"val/ema_loss_t{i}" for i in range(8)]


def _over(root, run_dir, *extra):
    return [f"data.root={root}", f"run.dir={run_dir}", "train.max_steps=4", "log.val_every=2", "log.val_samples=32",
            "train.global_batch=8", "train.micro_batch=4", "log.every=1", "checkpoint.every=2",
            "checkpoint.keep_last=5", *extra]


def _vals(run_dir) -> dict:
    """step -> validation record (the later record wins)."""
    return {r["step"]: r for r in read_metrics(run_dir) if is_val_record(r)}


def _max_diff(a: dict, b: dict) -> float:
    return max(abs(float(a[k]) - float(b[k])) for k in VAL_KEYS)


@pytest.fixture(scope="module")
def layout_runs(demo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("val_layouts")
    runs = {n: str(base / n) for n in ("ref", "dp2", "z1", "z3")}
    run_training(1, _over(demo_root, runs["ref"], "log.wandb.mode=offline", "log.wandb.project=dit-tests"),
                 launcher="python", ds_config="zero1.json")
    resume_copy(os.path.join(runs["ref"], "checkpoints", "step00000004"), runs["dp2"])
    run_training(2, _over(demo_root, runs["dp2"], "train.max_steps=6"), ds_config="zero1.json")
    run_training(2, _over(demo_root, runs["z1"]), ds_config="zero1.json")
    run_training(2, _over(demo_root, runs["z3"]), ds_config="zero3.json")
    return runs


def test_validation_loss_is_the_same_on_one_and_two_ranks_and_after_a_resume(layout_runs):
    ref, dp2 = _vals(layout_runs["ref"]), _vals(layout_runs["dp2"])
    assert sorted(ref) == [0, 2, 4]
    assert sorted(dp2) == [4, 6]  # step 4: the resumed weights, evaluated on 2 ranks before training on
    assert set(VAL_KEYS) <= set(ref[4])
    assert _max_diff(ref[4], dp2[4]) <= 1e-6
    # non-trivial weights: trained (lower than at step 0) and the EMA differs from the raw weights
    assert ref[4]["val/loss"] < ref[0]["val/loss"] - 0.01
    assert abs(ref[4]["val/loss"] - ref[4]["val/ema_loss"]) > 0.01
    assert ref[4]["val/timesteps"] == [62, 187, 312, 437, 562, 687, 812, 937]
    # training records are untouched by validation: one per step, no val key among them
    train = [r for r in read_metrics(layout_runs["ref"]) if not is_val_record(r)]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert not any(k.startswith("val/") for r in train for k in r)


def test_validation_loss_is_the_same_under_zero1_and_zero3(layout_runs):
    z1, z3 = _vals(layout_runs["z1"]), _vals(layout_runs["z3"])
    assert sorted(z1) == sorted(z3) == [0, 2, 4]
    for step in (0, 2, 4):
        assert _max_diff(z1[step], z3[step]) <= 1e-6, step
    assert abs(z3[4]["val/loss"] - z3[4]["val/ema_loss"]) > 0.01  # the EMA swap really ran under ZeRO-3


def test_wandb_offline_run_and_status_json_hold_the_validation_keys(layout_runs):
    import glob

    from trainer.monitor.wandb_sink import read_run_records

    run = layout_runs["ref"]
    files = sorted(glob.glob(os.path.join(run, "wandb", "offline-run-*", "run-*.wandb")))
    assert files
    history = read_run_records(files[0])["history"]
    rows = {row["_step"]: row for row in history if "val/loss" in row}
    assert sorted(rows) == [0, 2, 4] and set(VAL_KEYS) <= set(rows[4])
    assert rows[4]["val/ema_loss"] == pytest.approx(_vals(run)[4]["val/ema_loss"])
    out = subprocess.run([sys.executable, "-m", "trainer.status", run, "--json"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    v = json.loads(out)[0]["validation"]
    assert v["step"] == 4 and v["loss"] == pytest.approx(_vals(run)[4]["val/loss"])
    assert v["best_step"] == 4 and v["evaluations"] == 3 and v["trend"] == "falling" and len(v["ema_loss_t"]) == 8
    assert json.loads(out)[0]["step"] == 4  # the status' training step comes from training records
    text = subprocess.run([sys.executable, "-m", "trainer.status", run], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    assert "validation (step 4)" in text
    report = subprocess.run([sys.executable, "-m", "trainer.report", run], cwd=REPO, capture_output=True, text=True,
                            check=True)
    assert os.path.exists(os.path.join(run, "report", "validation.png")), report.stdout


# --------------------------------------------------------------------------- quality and the alert
@pytest.fixture(scope="module")
def demo_runs(demo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("val_quality")
    decay = yaml.safe_load(open(os.path.join(REPO, "configs", "demo.yaml")))["train"]["ema_decay"]
    common = [f"data.root={demo_root}", "log.val_samples=64", "log.every=10", "checkpoint.every=1000",
              "train.global_batch=8", "train.micro_batch=4"]
    healthy, fault = str(base / "healthy"), str(base / "fault")
    run_training(1, [f"run.dir={healthy}", "train.max_steps=300", "log.val_every=25", f"train.ema_decay={decay}",
                     *common], launcher="python")
    run_training(1, [f"run.dir={fault}", "train.max_steps=90", "log.val_every=10", "train.ema_decay=0.95", *common],
                 launcher="python", extra_env={"DIT_FAULT_PERTURB_WEIGHTS": "from=51;scale=0.6"})
    return healthy, fault


def _alerts(run_dir):
    from trainer.rundir import events_path, read_jsonl

    return [e for e in read_jsonl(events_path(run_dir)) if e.get("event") == "alert"]


def test_300_demo_steps_lower_the_validation_loss_in_every_bucket_and_raise_no_alert(demo_runs):
    healthy, _ = demo_runs
    vals = _vals(healthy)
    assert sorted(vals) == list(range(0, 301, 25))
    first, last = vals[0], vals[300]
    for i in range(8):
        assert last[f"val/loss_t{i}"] < first[f"val/loss_t{i}"], i
        assert last[f"val/ema_loss_t{i}"] < first[f"val/ema_loss_t{i}"], i
    assert not [a for a in _alerts(healthy) if a["title"] == "validation loss rising"]


def test_perturbed_weights_raise_the_rising_validation_alert_within_m_evaluations(demo_runs):
    _, fault = demo_runs
    vals = _vals(fault)
    rising = [a for a in _alerts(fault) if a["title"] == "validation loss rising"]
    assert len(rising) == 1, _alerts(fault)
    step = int(rising[0]["text"].split(":")[0].split()[1])
    assert 50 < step <= 50 + 3 * 10, rising  # M=3 evaluations (every 10 steps) after the fault began at step 51
    assert all(vals[s]["val/ema_loss"] < vals[s - 10]["val/ema_loss"] for s in range(10, 51, 10))  # healthy before


# --------------------------------------------------------------------------- the split
def _stream_keys(shard_dir: str, samples: int) -> set:
    from data_pipeline.elastic import ElasticStream

    stream = ElasticStream(shard_dir, global_batch=8, micro_batch=8, dp_rank=0, dp_size=1, seed=0)
    keys, it = set(), iter(stream)
    while len(keys) < samples:
        keys.update(next(it).keys)
    return keys


def _content(directory: str) -> set:
    from data_pipeline.val_split import read_samples

    _, latents, _ = read_samples(directory)
    return {hashlib.sha1(x.tobytes()).hexdigest() for x in latents}


def test_demo_validation_split_is_recorded_and_never_in_the_training_stream(demo_root):
    from data_pipeline.val_split import read_samples, recorded_val_dir

    train_dir = os.path.join(demo_root, "64")
    manifest = json.load(open(os.path.join(train_dir, "manifest.json")))
    val_dir = recorded_val_dir(train_dir)
    assert manifest["validation"]["num_samples"] == 160 and val_dir == os.path.join(demo_root, "val", "64")
    val_keys, _, _ = read_samples(val_dir)
    assert len(val_keys) == 160 and all(k.startswith("val-") for k in val_keys)
    seen = _stream_keys(train_dir, manifest["num_samples"])  # one whole epoch of the training stream
    assert len(seen) == manifest["num_samples"] and not seen & set(val_keys)
    assert not _content(val_dir) & _content(train_dir)  # no held-out latent equals a training latent


def test_config_refuses_a_validation_set_that_is_not_held_out(demo_root, tmp_path):
    from trainer.config.ds_json import load_ds_config
    from trainer.config.schema import ConfigError, load_config
    from trainer.config.validate import validate_run

    def check(*over, world=1):
        cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                          [f"data.root={demo_root}", f"run.dir={tmp_path / 'run'}", "log.val_every=10", "log.val_samples=64",
                           *over])
        return validate_run(cfg, load_ds_config("zero1"), world)

    check()  # the recorded held-out set
    with pytest.raises(ConfigError, match="training shard set itself"):
        check(f"data.val_root={demo_root}")
    leaky = tmp_path / "leaky"
    shutil.copytree(os.path.join(demo_root, "64"), leaky / "64")
    with pytest.raises(ConfigError, match="shares 1600 sample key"):
        check(f"data.val_root={leaky}")
    with pytest.raises(ConfigError, match="parallel.pipeline=2"):
        check("parallel.pipeline=2", world=2)
    with pytest.raises(ConfigError, match="log.val_samples=500"):
        check("log.val_samples=500")
    bare = tmp_path / "bare"
    shutil.copytree(os.path.join(demo_root, "64"), bare / "64")
    m = json.load(open(bare / "64" / "manifest.json"))
    del m["validation"]
    json.dump(m, open(bare / "64" / "manifest.json", "w"))
    with pytest.raises(ConfigError, match="records none"):
        check(f"data.root={bare}")


def test_encode_tool_writes_a_disjoint_validation_split(tmp_path):
    from data_pipeline.demo_data import export_demo_photos
    from data_pipeline.encode import main as encode_main

    photos = export_demo_photos(str(tmp_path / "photos"))
    # 8 classes of 1 photo each: a fraction holds out nothing; an explicit list holds out two photos
    first = sorted(os.listdir(photos))[:2]
    listed = tmp_path / "val.txt"
    listed.write_text("".join(f"{c}/{os.listdir(os.path.join(photos, c))[0]}\n" for c in first))
    out = tmp_path / "enc"
    assert encode_main(["--input", photos, "--out", str(out), "--resolutions", "64", "--val-list", str(listed),
                        "--no-progress", "--samples-per-shard", "4"]) == 0
    train = json.load(open(out / "64" / "manifest.json"))
    val = json.load(open(out / "val" / "64" / "manifest.json"))
    assert train["num_samples"] == 6 and val["num_samples"] == 2
    assert train["validation"]["dir"] == os.path.join("..", "val", "64")
    from data_pipeline.val_split import read_samples, shard_set_keys, split_indices

    assert not shard_set_keys(str(out / "val" / "64")) & shard_set_keys(str(out / "64"))
    _, _, labels = read_samples(str(out / "val" / "64"))
    assert sorted(labels.tolist()) == [0, 1]
    # the fraction split: per class, seeded, at least one held out, never a whole class
    tr, va = split_indices([0] * 10 + [1] * 20 + [2], 0.1, seed=3)
    assert len(va) == 1 + 2 and not set(tr) & set(va) and 30 in tr and sorted(tr + va) == list(range(31))
    assert split_indices([0] * 10 + [1] * 20 + [2], 0.1, seed=3) == (tr, va)


# --------------------------------------------------------------------------- honest FID naming
class _Features:
    @staticmethod
    def module(dim: int, fail: bool = False):
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(3, dim)
                self.fail = fail

            def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
                if self.fail:
                    raise RuntimeError("broken extractor")
                return self.proj(x.float().mean(dim=(2, 3)))

        return torch.jit.script(Net())


def test_evaluate_names_the_distance_after_its_feature_extractor(tmp_path):
    import torch

    from trainer.tools.evaluate import compute_metrics

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8))
    other = tmp_path / "clip-small.pt"
    torch.jit.save(_Features.module(16), str(other))
    out = compute_metrics(images, str(other), str(ref))
    assert "fid" not in out and out["fd_clip_small"] > 0
    fe = out["feature_extractor"]
    assert fe["name"] == "clip-small" and fe["dim"] == 16
    assert fe["sha256"] == hashlib.sha256(open(other, "rb").read()).hexdigest()
    wide = tmp_path / "resnet-2048.pt"  # 2048-d but not Inception: still not FID
    torch.jit.save(_Features.module(2048), str(wide))
    assert "fd_resnet_2048" in compute_metrics(images, str(wide), str(ref))
    inception = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(_Features.module(2048), str(inception))
    out = compute_metrics(images, str(inception), str(ref))
    assert "fid" in out and out["feature_extractor"]["name"] == "inception-v3-pool3"
    broken = tmp_path / "inception-broken.pt"
    torch.jit.save(_Features.module(2048, fail=True), str(broken))
    with pytest.raises(Exception, match="broken extractor"):
        compute_metrics(images, str(broken), str(ref))


def test_validation_cost_at_dit_xl2_256px_from_the_flop_model():
    from models.dit import DiTArgs
    from trainer.loop.validation import validation_cost

    arch = DiTArgs.from_preset("DiT-XL/2", input_size=32, num_classes=1000)
    c = validation_cost(arch, 32, samples=1024, timesteps=8)
    print(f"DiT-XL/2 256 px: {c['eval_flops'] / 1e15:.1f} PFLOP per evaluation (1024 samples x 8 t x raw+EMA), "
          f"= {c['train_sample_equivalents']:.0f} training samples")
    assert c["forward_flops"] == pytest.approx(2 * 118.6e9, rel=0.02)  # the DiT paper's 118.6 GMACs
    assert c["train_sample_equivalents"] == pytest.approx(2 * 1024 * 8 / 3)


# --------------------------------------------------------------------------- both objectives, in one process
class _Engine:
    """The pieces of a DeepSpeed engine the validation uses, over a plain DiT (ZeRO-0, one process)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_optimization_stage(self):
        return 0


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_validation_of_both_objectives_is_fixed_and_puts_the_weights_back(demo_root, tmp_path, kind):
    import types

    import torch

    from trainer.config.model import architecture
    from trainer.config.schema import load_config
    from trainer.config.shards import open_shard_set
    from trainer.config.stages import resolve_stages
    from trainer.config.topology import Topology
    from trainer.engine.objective import build_objective_from_config
    from trainer.loop.validation import Validation, val_timesteps
    from trainer.monitor.metrics import Metrics
    from trainer.state.checkpoint import TrainerState
    from trainer.state.ema import EMA

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      [f"data.root={demo_root}", f"run.dir={tmp_path}", "log.val_every=1", "log.val_samples=24",
                       f"objective.kind={kind}", "sample.method=" + ("euler" if kind == "flow" else "ddim")])
    shards = open_shard_set(demo_root, 64)
    arch = architecture(cfg, in_channels=4, input_size=8, num_classes=shards.num_classes)
    torch.manual_seed(0)
    model = arch.build()
    with torch.no_grad():  # non-trivial weights (DiT zero-initialises its output layers)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ema = EMA(model, 0.99)
    with torch.no_grad():
        for s in ema.shadow:
            s.add_(torch.randn_like(s) * 0.02)  # the EMA differs from the weights
    logged = []
    sink = types.SimpleNamespace(log=logged.append, event=lambda r: None, log_image=lambda *a: None,
                                 alert=lambda *a: None, close=lambda: None)
    tr = types.SimpleNamespace(cfg=cfg, rank=0, run_dir=str(tmp_path), engine=_Engine(model), ema=ema,
                               objective=build_objective_from_config(cfg, arch.learn_sigma), device=torch.device("cpu"),
                               topo=Topology(1), dp_rank=0, shard_sets=[shards], arch=arch, state=TrainerState(),
                               metrics=Metrics([sink]), beacon=None)
    stage = resolve_stages(cfg)[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    v = Validation(tr)
    first, second = v.evaluate(stage), v.evaluate(stage)
    assert _max_diff(first, second) == 0.0  # fixed samples, timesteps and noise: identical at every evaluation
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # trained weights put back exactly
    assert abs(first["val/loss"] - first["val/ema_loss"]) > 1e-4
    ts = val_timesteps(tr.objective, 8).tolist()
    if kind == "flow":
        assert ts == pytest.approx([(k + 0.5) / 8 for k in range(8)])
    else:
        assert ts == [62, 187, 312, 437, 562, 687, 812, 937]
    # the raw number is the objective's per-sample MSE at those timesteps, by hand
    from data_pipeline.val_split import read_samples
    from trainer.loop.validation import val_noise

    _, x, y = read_samples(os.path.join(demo_root, "val", "64"), 24)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    noise = torch.stack([val_noise(cfg.run.seed, i, 8, x.shape[1:]) for i in range(24)])
    k = 3
    t = torch.tensor(ts)[k].repeat(24)
    with torch.no_grad():
        out = tr.objective.training_losses(model.eval(), x, t, noise=noise[:, k],
                                           model_kwargs={"y": y, "force_drop_ids": torch.zeros(24, dtype=torch.long)})
    assert first["val/loss_t3"] == pytest.approx(float(out["mse"].double().mean()), rel=1e-6)
