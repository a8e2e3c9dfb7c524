"""Monitoring end to end on real 2-rank DeepSpeed CPU runs (ZeRO-2, configs/tiny.yaml).

One run (module fixture) trains 6 steps with W&B offline, a fake WANDB_API_KEY in its environment and
a NaN injected into the loss of step 3 on rank 0 only. A copy of it is resumed with NaNs at steps 8
and 9, ``train.max_nan_steps=2`` and rollbacks off (``train.max_rollbacks=0``; tests/test_rollback.py has them
on), which must reuse the W&B run id and stop with a checkpoint of the last good weights.
"""
import glob
import json
import os
import shutil
import subprocess

import pytest
import torch

from tests.runs import REPO, _env, _flat_tensors, train_cmd

FAKE_KEY = "local-0123456789abcdef0123456789abcdeffakekey42"

METRIC_KEYS = {
    "loss", "mse", "vb", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "grad_norm", "skipped", "skipped_steps",
    "samples_per_sec", "images_per_sec", "samples_per_sec_per_device", "step_time", "data_time", "fwd_time",
    "bwd_time", "opt_time", "sync_time", "mfu", "tflops_per_device", "peak_tflops", "model_tflops_per_sample",
    "rss_gb", "max_rss_gb", "stage", "resolution", "data_skipped_samples", "eta_sec", "progress", "samples_seen",
}


def _run(overrides, env_extra, timeout=300):
    env = _env()
    env.update(env_extra)
    cmd = train_cmd(2, overrides, ds_config="zero2.json")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _overrides(demo_root, run_dir, steps, *extra):
    return [f"data.root={demo_root}", f"run.dir={run_dir}", f"train.max_steps={steps}", "log.every=1",
            "train.precision=fp32", "checkpoint.every=1", "checkpoint.keep_last=20", "log.wandb.mode=offline",
            "log.wandb.project=dit-tests", *extra]


def _metrics(run_dir):
    from trainer.rundir import read_jsonl

    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def _events(run_dir):
    from trainer.rundir import read_jsonl

    return read_jsonl(os.path.join(run_dir, "events.jsonl"))


def _module_state(run_dir, step):
    path = os.path.join(run_dir, "checkpoints", f"step{step:08d}", "mp_rank_00_model_states.pt")
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def _adam_state(run_dir, step):
    out = []
    for f in sorted(glob.glob(os.path.join(run_dir, "checkpoints", f"step{step:08d}", "*optim_states.pt"))):
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        out.append(sd)
    return out


@pytest.fixture(scope="module")
def monitored_run(demo_root, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("monitored"))
    proc = _run(_overrides(demo_root, run_dir, 6, "log.sample_every=3"),
                {"WANDB_API_KEY": FAKE_KEY, "DIT_FAULT_NAN_STEPS": "3"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir, proc


@pytest.fixture(scope="module")
def resumed_nan_stop_run(demo_root, monitored_run, tmp_path_factory):
    src, _ = monitored_run
    run_dir = str(tmp_path_factory.mktemp("resumed") / "run")
    shutil.copytree(src, run_dir)
    proc = _run(_overrides(demo_root, run_dir, 12, "train.max_nan_steps=2", "train.max_rollbacks=0"),
                {"WANDB_API_KEY": FAKE_KEY, "DIT_FAULT_NAN_STEPS": "8,9"})
    return run_dir, proc


def _wandb_files(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))


def test_offline_wandb_run_holds_the_metrics_and_a_sample_image(monitored_run):
    from trainer.monitor.wandb_sink import read_run_records

    run_dir, _ = monitored_run
    run_id = open(os.path.join(run_dir, "wandb_run_id")).read().strip()
    files = _wandb_files(run_dir)
    assert len(files) == 1 and files[0].endswith(f"run-{run_id}.wandb")
    rec = read_run_records(files[0])
    assert rec["run_id"] == run_id
    logged = set().union(*(row.keys() for row in rec["history"]))
    assert METRIC_KEYS <= logged, sorted(METRIC_KEYS - logged)
    steps = sorted({row["_step"] for row in rec["history"] if "loss" in row})
    assert steps == list(range(1, 7))
    images = [row["samples"] for row in rec["history"] if "samples" in row]
    assert len(images) == 2 and all(img["_type"] == "image-file" and img["format"] == "png" for img in images)
    media = glob.glob(os.path.join(os.path.dirname(files[0]), "files", "media", "images", "samples_*.png"))
    assert len(media) == 2
    # each grid's sampled-latent spread: in its events.jsonl image event and beside the image in W&B
    events = [json.loads(line) for line in open(os.path.join(run_dir, "events.jsonl"))]
    spreads = {e["step"]: e for e in events if e.get("event") == "image"}
    assert sorted(spreads) == [3, 6]
    for step, event in spreads.items():
        assert 0 < event["latent_std"] < event["latent_absmax"] < 1e3, event
        row = next(r for r in rec["history"] if r.get("_step") == step and "samples" in r)
        assert (row["samples/latent_std"], row["samples/latent_absmax"]) == pytest.approx(
            (event["latent_std"], event["latent_absmax"]))
    # config logged resolved: run config, filled DeepSpeed config, model architecture
    cfg = rec["config"]
    assert cfg["config"]["train"]["max_steps"] == 6 and cfg["config"]["log"]["wandb"]["mode"] == "offline"
    assert cfg["deepspeed"]["train_batch_size"] == 8 and cfg["model_arch"]["depth"] == 2
    # the same numbers as metrics.jsonl
    jsonl = {r["step"]: r for r in _metrics(run_dir)}
    row5 = next(r for r in rec["history"] if r.get("_step") == 5 and "loss" in r)
    assert row5["loss"] == pytest.approx(jsonl[5]["loss"]) and row5["mfu"] == pytest.approx(jsonl[5]["mfu"])


def test_metrics_jsonl_has_every_metric_with_sane_values(monitored_run):
    run_dir, _ = monitored_run
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert METRIC_KEYS <= set(r), sorted(METRIC_KEYS - set(r))
        assert r["resolution"] == 64 and r["stage"] == 0 and r["total_steps"] == 6
        assert 0 < r["mfu"] < 1 and r["samples_per_sec"] > 0 and r["images_per_sec"] == r["samples_per_sec"]
        assert r["fwd_time"] > 0 and r["bwd_time"] > 0 and r["opt_time"] > 0 and r["rss_gb"] > 0.05
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / r["peak_tflops"])
        assert r["data_skipped_samples"] == 0
    last = records[-1]
    assert last["eta_sec"] == 0 and last["progress"] == 1.0
    good = [r for r in records if r["step"] != 3]
    # Each quartile's mean is positive, or "nan" in a log window none of whose 8 samples drew a timestep in it
    # (telemetry.quartile_means); over the run every quartile is seen.
    for k in range(4):
        values = [r[f"loss_q{k}"] for r in good]
        assert all(v == "nan" or isinstance(v, float) and v > 0 for v in values), (k, values)
        assert any(isinstance(v, float) and v > 0 for v in values), (k, values)


def test_nan_step_is_skipped_counted_and_changes_no_weights(monitored_run):
    run_dir, proc = monitored_run
    by_step = {r["step"]: r for r in _metrics(run_dir)}
    assert by_step[3]["loss"] == "nan" and by_step[3]["skipped"] == 1
    assert [by_step[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert all(by_step[s]["skipped"] == 0 for s in (1, 2, 4, 5, 6))
    before, after, next_ = (_module_state(run_dir, s) for s in (2, 3, 4))
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped step: weights bit-identical
    assert any(not torch.equal(after[k], next_[k]) for k in after)  # the next step trains again
    # Adam moments and step counts are untouched too (both ranks' ZeRO partitions)
    for a, b in zip(_adam_state(run_dir, 2), _adam_state(run_dir, 3)):
        pairs = list(zip(_flat_tensors(a), _flat_tensors(b)))
        assert pairs and all(torch.equal(x, y) for (_, x), (_, y) in pairs)
    state = json.load(open(os.path.join(run_dir, "checkpoints", "step00000006", "trainer_state.json")))
    assert state["nan_skipped"] == 1 and state["step"] == 6 and state["samples_seen"] == 48
    alerts = [e for e in _events(run_dir) if e.get("event") == "alert"]
    assert [a["title"] for a in alerts] == ["non-finite loss"]
    assert "[alert] non-finite loss: step 3" in proc.stderr


def test_api_key_is_in_no_file_of_the_run_directory(monitored_run, resumed_nan_stop_run):
    needle = FAKE_KEY.encode()
    checked = 0
    for run_dir, proc in (monitored_run, resumed_nan_stop_run):
        assert FAKE_KEY not in proc.stdout + proc.stderr
        for root, _, names in os.walk(run_dir):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    assert needle not in f.read(), os.path.join(root, name)
                checked += 1
    assert checked > 50


def test_status_of_the_finished_run(monitored_run):
    from trainer.tools.status import format_status, run_status

    run_dir, _ = monitored_run
    s = run_status(run_dir, query_slurm=False)
    assert s["state"] == "finished" and s["step"] == 6 and s["total_steps"] == 6
    assert "NAN" in s["flags"] and s["skipped_steps"] == 1
    assert s["last_checkpoint"]["tag"] == "step00000006" and 0 < s["mfu"] < 1
    text = format_status(s)
    assert "[FINISHED]" in text and "step 6/6" in text and "non-finite loss" in text


def test_resume_reuses_the_wandb_run_and_nan_streak_stops_with_last_good_checkpoint(monitored_run,
                                                                                   resumed_nan_stop_run):
    from trainer.rundir import EXIT_NAN_STOP
    from trainer.state.checkpoint import verify_checkpoint
    from trainer.tools.status import run_status
    from trainer.monitor.wandb_sink import read_run_records

    src, _ = monitored_run
    run_dir, proc = resumed_nan_stop_run
    assert proc.returncode == EXIT_NAN_STOP, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_id = open(os.path.join(src, "wandb_run_id")).read().strip()
    assert open(os.path.join(run_dir, "wandb_run_id")).read().strip() == run_id
    files = _wandb_files(run_dir)
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
    second = read_run_records(max(files, key=os.path.getmtime))
    assert second["run_id"] == run_id
    assert sorted({r["_step"] for r in second["history"] if "loss" in r}) == [7, 8, 9]
    # steps 8 and 9 skipped, two in a row = max_nan_steps: stop at 9 with a checkpoint of step 7's weights
    ck = os.path.join(run_dir, "checkpoints")
    assert open(os.path.join(ck, "latest")).read().strip() == "step00000009"
    assert not os.path.exists(os.path.join(ck, "step00000010"))
    for s in (7, 8, 9):
        assert verify_checkpoint(os.path.join(ck, f"step{s:08d}")) is None
    good, stopped = _module_state(run_dir, 7), _module_state(run_dir, 9)
    assert all(torch.equal(good[k], stopped[k]) for k in good)
    state = json.load(open(os.path.join(ck, "step00000009", "trainer_state.json")))
    assert state["nan_skipped"] == 3 and state["step"] == 9
    errors = [e for e in _events(run_dir) if e.get("event") == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "nan_stop" and errors[0]["step"] == 9
    s = run_status(run_dir, query_slurm=False)
    assert s["state"] == "crashed" and "NAN-STOP" in s["flags"] and s["step"] == 9
