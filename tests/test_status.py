"""``trainer.status`` on hand-made run directories: running, stalled, crashed (three ways), preempted, finished.

Times are passed in (``now=``), so nothing here sleeps or depends on the clock.
"""
import json
import os
import subprocess
import sys

import pytest

from trainer.tools.status import format_status, loss_trend, main, run_status, slurm_job_id, slurm_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOW = 1_800_000_000.0


def make_run(root, name, *, steps=20, total=100, heartbeat_age=5.0, idle=5.0, events=(), stalled=False,
             hb_state="running", stall_minutes=10, lease=True):
    """A run directory as a run on another host ("node7") leaves it; a live run holds the lease (lease.json)."""
    run = root / name
    (run / "checkpoints" / "step00000020").mkdir(parents=True)
    (run / "checkpoints" / "step00000020" / "COMPLETE.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step00000020\n")
    os.utime(run / "checkpoints" / "step00000020" / "COMPLETE.json", (NOW - 600, NOW - 600))
    (run / "config.yaml").write_text(f"run:\n  name: {name}\ntrain:\n  max_steps: {total}\n"
                                     f"log:\n  stall_minutes: {stall_minutes}\n")
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 1.0 / s, "samples_per_sec": 50.0, "mfu": 0.42, "stage": 0,
                                "resolution": 256, "total_steps": total, "eta_sec": (total - s) * 2.0,
                                "skipped_steps": 0, "time": NOW - idle}) + "\n")
        f.write('{"step": 21, "loss": 0.0')  # a torn last line (killed mid-write) is ignored
    with open(run / "events.jsonl", "w") as f:
        f.write(json.dumps({"event": "started", "step": 0, "time": NOW - 3600}) + "\n")
        for e in events:
            f.write(json.dumps(e) + "\n")
    if heartbeat_age is not None:
        (run / "heartbeat.json").write_text(json.dumps({
            "time": NOW - heartbeat_age, "step": steps, "last_step_time": NOW - idle, "stalled": stalled,
            "state": hb_state, "host": "node7", "pid": 1, "lease_token": "t0"}))
    if lease:
        (run / "lease.json").write_text(json.dumps({"token": "t0", "host": "node7", "pid": 1, "started": NOW - 3600}))
    return str(run)


def test_running(tmp_path):
    s = run_status(make_run(tmp_path, "r"), now=NOW, query_slurm=False)
    assert s["state"] == "running" and s["flags"] == []
    assert s["step"] == 20 and s["total_steps"] == 100 and s["eta_sec"] == 160.0
    assert s["loss"] == pytest.approx(0.05) and s["loss_trend"]["change"] < 0
    assert s["last_checkpoint"]["tag"] == "step00000020" and s["last_checkpoint"]["age_sec"] == pytest.approx(600)
    text = format_status(s)
    assert "[RUNNING]" in text and "step 20/100 (20.0%)" in text and "ETA 2m40s" in text
    assert "MFU 42.0%" in text and "50.0 samples/s" in text and "step00000020 (10m00s ago)" in text


def test_stalled_by_watchdog_flag_or_step_age(tmp_path):
    flagged = run_status(make_run(tmp_path, "a", stalled=True), now=NOW, query_slurm=False)
    assert flagged["state"] == "stalled" and "STALL" in flagged["flags"]
    old_step = run_status(make_run(tmp_path, "b", idle=11 * 60), now=NOW, query_slurm=False)
    assert old_step["state"] == "stalled" and "no step for 11m" in old_step["reason"]
    assert "[STALLED] !STALL" in format_status(old_step)


def test_crashed_without_heartbeat_or_with_an_error_event(tmp_path):
    gone = run_status(make_run(tmp_path, "gone", heartbeat_age=20 * 60), now=NOW, query_slurm=False)
    assert gone["state"] == "crashed" and "no heartbeat for 20m" in gone["reason"] and "CRASHED" in gone["flags"]
    assert gone["eta_sec"] is None
    err = run_status(make_run(tmp_path, "err", events=[{"event": "error", "step": 20, "kind": "RuntimeError",
                                                       "message": "CUDA error: an illegal memory access"}]),
                     now=NOW, query_slurm=False)
    assert err["state"] == "crashed" and "illegal memory access" in err["reason"]
    never = tmp_path / "never"
    never.mkdir()
    assert run_status(str(never), now=NOW, query_slurm=False)["state"] == "crashed"


def test_hung_and_first_failure_name_the_rank_and_node(tmp_path):
    """The one 'error' event a failure verdict writes (trainer/monitor/liveness.py): hung names the stuck rank first,
    a rank failure the rank that failed first."""
    msg = ("no progress for 18 s (run.hang_timeout_minutes): rank 1 on node2: no sign of life for 19 s; "
           "then rank 0 on node1 (waiting at step 62 backward since 12:00:00)")
    hung = run_status(make_run(tmp_path, "hung", events=[{"event": "error", "kind": "hang", "step": 61, "message": msg,
                                                         "first_rank": 1, "first_host": "node2"}]),
                      now=NOW, query_slurm=False)
    assert hung["state"] == "hung" and "HUNG" in hung["flags"] and hung["reason"] == msg
    assert (hung["failure"]["first_rank"], hung["failure"]["first_host"]) == (1, "node2")
    text = format_status(hung)
    assert "[HUNG] !HUNG" in text and f"why: {msg}" in text
    dead = run_status(make_run(tmp_path, "dead", events=[{"event": "error", "kind": "rank_failure", "step": 20,
                                                         "message": "rank 1 on node2: no sign of life since 12:00:01; "
                                                                    "then rank 0 on node1 (Connection reset by peer)",
                                                         "first_rank": 1, "first_host": "node2"}]),
                      now=NOW, query_slurm=False)
    assert dead["state"] == "crashed" and dead["reason"].startswith("first failure: rank 1 on node2: no sign of life")


def test_finished_and_resumed_after_an_earlier_finish(tmp_path):
    fin = make_run(tmp_path, "fin", steps=100, events=[{"event": "finished", "step": 100, "time": NOW - 10}],
                   heartbeat_age=3 * 3600, hb_state="finished")
    s = run_status(fin, now=NOW, query_slurm=False)
    assert s["state"] == "finished" and s["eta_sec"] == 0
    # extended with more steps later: a new 'started' after the 'finished' event makes it running again
    again = make_run(tmp_path, "again", events=[{"event": "finished", "step": 100}, {"event": "started", "step": 100}])
    assert run_status(again, now=NOW, query_slurm=False)["state"] == "running"


def test_preempted_and_alert_flags(tmp_path):
    pre = make_run(tmp_path, "pre", heartbeat_age=300, hb_state="preempted", lease=False)  # released at exit
    assert run_status(pre, now=NOW, query_slurm=False)["state"] == "preempted"
    alerts = [{"event": "alert", "title": "non-finite loss", "text": "step 7: loss is NaN", "level": "WARN"},
              {"event": "alert", "title": "loss spike", "text": "step 9: loss 9 is 4.0x", "level": "WARN"}]
    s = run_status(make_run(tmp_path, "al", events=alerts), now=NOW, query_slurm=False)
    assert s["flags"] == ["NAN", "SPIKE"] and s["alert_count"] == 2
    assert "alerts (2): non-finite loss: step 7" in format_status(s)


def test_slurm_job_from_file_or_launch_record(tmp_path, monkeypatch):
    run = make_run(tmp_path, "sl")
    assert slurm_job_id(run) is None and run_status(run, now=NOW)["slurm_state"] == "n/a"
    os.makedirs(os.path.join(run, "launch"))
    with open(os.path.join(run, "launch", "env-1234.0.txt"), "w") as f:
        f.write("SLURM_JOB_ID=1234\nSLURM_NNODES=2\n")
    assert slurm_job_id(run) == "1234"
    with open(os.path.join(run, "slurm_job_id"), "w") as f:
        f.write("5678\n")
    assert slurm_job_id(run) == "5678"
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue on PATH
    assert slurm_state("5678") == "n/a (no squeue here)"
    fake = tmp_path / "squeue"
    fake.write_text("#!/bin/sh\necho RUNNING\n")
    fake.chmod(0o755)
    assert slurm_state("5678") == "RUNNING"


def test_loss_trend():
    t = loss_trend([1.0, 1.0, 0.5, 0.5])
    assert t["previous_mean"] == 1.0 and t["recent_mean"] == 0.5 and t["change"] == pytest.approx(-0.5)
    assert len(loss_trend(list(range(100, 0, -1)))["sparkline"]) == 24
    assert loss_trend([float("nan")])["recent_mean"] is None


def test_cli_json_and_text_without_importing_torch(tmp_path):
    a = make_run(tmp_path, "a", events=[{"event": "finished", "step": 20}])
    b = make_run(tmp_path, "b", heartbeat_age=None, lease=False)
    code = ("import sys, json, io, contextlib; import trainer.tools.status as s\n"
            "buf = io.StringIO()\n"
            f"with contextlib.redirect_stdout(buf): rc = s.main([{a!r}, {b!r}, '--json'])\n"
            "out = json.loads(buf.getvalue())\n"
            "print(rc, [r['state'] for r in out], 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["0", "['finished',", "'crashed']", "False"], proc.stderr
    assert main([a]) == 0 and main([str(tmp_path / "missing")]) == 2
