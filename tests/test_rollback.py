"""Automatic rollback end to end (trainer/loop/rollback.py) on real runs of configs/tiny.yaml.

Run A (2 ranks, ZeRO-2, global batch 8, a checkpoint every 3 steps, train.max_nan_steps=2, train.max_rollbacks=1)
carries two activation overflows (trainer/monitor/faults.py):
  * one keyed to the DATA: the batches holding samples 64..79 (steps 9 and 10 of the first attempt). Step 9's
    checkpoint is written inside the streak; at step 10 the run rolls back to step 6 (the newest checkpoint before
    the onset, step 9), sets step 9's checkpoint aside and continues at sample 80: window [48, 80) skipped;
  * one keyed to STEPS 12 and 13: it strikes again after the rollback, so with the one rollback used up the run
    stops with exit 6, sets aside step 12's checkpoint and leaves step 9 (written after the rollback) as the
    intact last good checkpoint.
Run R is A's step-6 checkpoint resumed with data_position 80, i.e. started from that checkpoint with that window
skipped through the existing resume contract (tests/runs.py's resume_copy; no new mechanism on the reference side).
Run C is A's run directory with every checkpoint after step 6 removed (a crash right after the rollback): resuming
it must find the window in rollbacks.jsonl and skip it again.
Run B (one process) blows the loss up 10x on samples 160..191 (steps 21-24): the spike detector's sustained
blow-up (train.blowup_steps=3) rolls back to step 20 past that data and the run finishes.
"""
import json
import os
import shutil

import pytest
import torch

from tests.runs import checkpoint_tensors, losses_by_step, read_metrics, resume_copy, run_training
from trainer.rundir import EXIT_DIVERGED, read_jsonl

STEPS = 14


def _over(root, run_dir, *extra):
    return [f"data.root={root}", f"run.dir={run_dir}", f"train.max_steps={STEPS}", "log.every=1",
            "train.precision=fp32", "train.global_batch=8", "train.micro_batch=4", "train.lr_schedule=cosine",
            "train.warmup_steps=2", "train.min_lr=1e-4", "checkpoint.every=3", "checkpoint.keep_last=10",
            "train.max_nan_steps=2", "train.max_rollbacks=1", *extra]


def _ck(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step{step:08d}")


def _events(run_dir, kind):
    return [e for e in read_jsonl(os.path.join(run_dir, "events.jsonl")) if e.get("event") == kind]


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("rollback")
    a, r, c = (str(base / n) for n in ("a", "ref", "resumed"))
    faults = "samples=64-79;ranks=1;block=0 | steps=12,13;ranks=0;block=1"
    proc_a = run_training(2, _over(demo_root, a), check=False, timeout=600, extra_env={"DIT_FAULT_ACTIVATION": faults})
    assert proc_a.returncode == EXIT_DIVERGED, proc_a.stdout[-3000:] + proc_a.stderr[-6000:]
    state6 = json.load(open(os.path.join(_ck(a, 6), "trainer_state.json")))
    assert state6["data_position"] == 48 and state6["rollbacks"] == 0  # written before the rollback
    resume_copy(_ck(a, 6), r, data_position=80, data_batches=state6["data_batches"] + 4)
    run_training(2, _over(demo_root, r), timeout=600)
    shutil.copytree(a, c)
    for name in os.listdir(os.path.join(c, "checkpoints")):
        if name.startswith("step") and name != "step00000006" or name == "diverged":
            shutil.rmtree(os.path.join(c, "checkpoints", name))
    with open(os.path.join(c, "checkpoints", "latest"), "w") as f:
        f.write("step00000006\n")
    proc_c = run_training(2, _over(demo_root, c), timeout=600)
    return {"a": a, "proc_a": proc_a, "ref": r, "resumed": c, "proc_c": proc_c}


def test_nonfinite_streak_rolls_back_skips_the_window_and_continues(runs):
    a = runs["a"]
    (rb,) = _events(a, "rollback")
    assert (rb["reason"], rb["from_step"], rb["onset_step"], rb["to_step"]) == ("non-finite steps", 10, 9, 6)
    assert rb["checkpoint"] == "step00000006" and rb["set_aside"] == ["step00000009"]
    assert [(w["stage"], w["start"], w["end"]) for w in rb["windows"]] == [(0, 48, 80)] and rb["skipped_samples"] == 32
    assert read_jsonl(os.path.join(a, "rollbacks.jsonl"))[0]["windows"] == rb["windows"]
    # metrics: cut back to step 6 at the rollback, then steps 7.. of the second attempt: no step twice
    records = read_metrics(a)
    assert [r["step"] for r in records] == list(range(1, 14))
    assert all(isinstance(r["loss"], float) for r in records if 7 <= r["step"] <= 11)  # the bad data is gone
    # the checkpoint written after the rollback carries it (so every later resume keeps the skip)
    state9 = json.load(open(os.path.join(_ck(a, 9), "trainer_state.json")))
    assert state9["rollbacks"] == 1 and state9["data_position"] == 80 + 3 * 8
    assert [(w["start"], w["end"]) for w in state9["data_skips"]] == [(48, 80)]
    alerts = [e["title"] for e in _events(a, "alert")]
    assert alerts.count("rolled back") == 1 and "[alert] rolled back: non-finite steps at step 10" in runs["proc_a"].stderr


def test_losses_after_the_rollback_equal_a_run_started_there_with_the_window_skipped(runs):
    a, ref = losses_by_step(runs["a"]), losses_by_step(runs["ref"])
    assert [a[s] for s in range(7, 12)] == [ref[s] for s in range(7, 12)]  # bit for bit, until A's second fault
    mine, theirs = checkpoint_tensors(_ck(runs["a"], 9)), checkpoint_tensors(_ck(runs["ref"], 9))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_past_max_rollbacks_the_run_stops_with_the_last_good_checkpoint_intact(runs):
    from trainer.state.checkpoint import list_checkpoints, verify_checkpoint
    from trainer.tools.status import format_status, run_status

    a = runs["a"]
    assert runs["proc_a"].returncode == EXIT_DIVERGED
    assert [s for s, _ in list_checkpoints(os.path.join(a, "checkpoints"))] == [9, 6, 3]
    assert open(os.path.join(a, "checkpoints", "latest")).read().strip() == "step00000009"
    assert verify_checkpoint(_ck(a, 9), deep=True) is None
    aside = sorted(os.listdir(os.path.join(a, "checkpoints", "diverged")))
    assert aside == ["step00000009", "step00000012"]  # attempt 1's step 9, attempt 2's step 12 (in the streak)
    (err,) = _events(a, "error")
    assert err["kind"] == "diverged" and err["step"] == 13 and err["onset_step"] == 12
    assert "after 1 rollback(s) (train.max_rollbacks=1)" in err["message"] and "step00000009" in err["message"]
    s = run_status(a, query_slurm=False)
    assert s["state"] == "crashed" and {"ROLLBACK", "DIVERGED"} <= set(s["flags"]) and s["rollback_count"] == 1
    assert "rollbacks 1: last non-finite steps at step 10 -> step00000006 (step 6), skipped samples [48, 80)" \
        in format_status(s)


def test_a_resume_from_before_the_rollback_repeats_the_skip(runs):
    c, ref = runs["resumed"], losses_by_step(runs["ref"])
    assert "skipping samples [48, 80) of stage 0 (recorded by rollback 1)" in runs["proc_c"].stdout
    got = losses_by_step(c)
    assert [got[s] for s in range(7, STEPS + 1)] == [ref[s] for s in range(7, STEPS + 1)]
    state = json.load(open(os.path.join(_ck(c, STEPS), "trainer_state.json")))
    assert state["rollbacks"] == 1 and state["data_position"] == 80 + (STEPS - 6) * 8


def test_a_sustained_loss_blowup_rolls_back_past_its_data(demo_root, tmp_path):
    run = str(tmp_path / "b")
    proc = run_training(1, [f"data.root={demo_root}", f"run.dir={run}", "train.max_steps=30", "log.every=1",
                            "checkpoint.every=4", "checkpoint.keep_last=10", "train.blowup_steps=3",
                            "train.max_rollbacks=2"], launcher="python", timeout=600,
                        extra_env={"DIT_FAULT_LOSS_SCALE": "samples=160-191;factor=10"})
    (rb,) = _events(run, "rollback")
    assert (rb["reason"], rb["onset_step"], rb["from_step"], rb["to_step"]) == ("loss blow-up", 21, 24, 20)
    assert [(w["start"], w["end"]) for w in rb["windows"]] == [(160, 192)]
    assert [e["title"] for e in _events(run, "alert")] == ["loss spike", "rolled back"]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 31)) and "finished" in proc.stdout
