"""One writer per run directory and a status that tells the truth, on real runs (2 CPU ranks under the deepspeed
launcher; the refused second launch is a plain process).

A first run pauses right after its step-4 checkpoint (the test hook), heartbeating with the stall alert off:
status says running; a second launch on the same run.dir is refused naming the holder; the first run is
SIGKILLed with its whole process group: status says crashed; the next launch takes the lease over at once (the
holder's pid is gone on this host), resumes, and finishes with every step in metrics.jsonl exactly once.
A USR1 during the pause: the run checkpoints, releases the run directory and status says preempted.
"""
import json
import os
import signal
import socket
import time

from tests.runs import kill_group, losses_by_step, read_metrics, run_training, start_training, wait_for
from trainer.rundir import EXIT_PREEMPTED, EXIT_RUN_DIR_BUSY, read_jsonl
from trainer.state.lease import read_lease
from trainer.tools.status import run_status

STEPS = 10


def _overrides(demo_root, run_dir, *extra):
    return [f"data.root={demo_root}", f"run.dir={run_dir}", f"train.max_steps={STEPS}", "log.every=1",
            "checkpoint.every=4", "checkpoint.keep_last=5", "log.stall_minutes=0", "log.heartbeat_seconds=0.5",
            "run.lease_timeout_minutes=10", *extra]


def _paused_at_checkpoint(run_dir, proc, step=4):
    latest = os.path.join(run_dir, "checkpoints", "latest")
    wait_for(lambda: os.path.exists(latest) and open(latest).read().strip() == f"step{step:08d}" or proc.poll() is not None,
             300, f"the step-{step} checkpoint")
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    hb = os.path.join(run_dir, "heartbeat.json")
    t0 = time.time()
    wait_for(lambda: os.path.exists(hb) and json.load(open(hb))["time"] > t0, 30, "a heartbeat during the pause")


def test_one_writer_per_run_dir_and_status_through_a_kill(demo_root, tmp_path):
    run_dir = str(tmp_path / "run")
    over = _overrides(demo_root, run_dir)
    ref_dir = str(tmp_path / "ref")
    run_training(2, _overrides(demo_root, ref_dir))

    first = start_training(2, over, extra_env={"DIT_FAULT_PAUSE_AFTER_CHECKPOINT": "4:300"})
    try:
        _paused_at_checkpoint(run_dir, first)
        holder = read_lease(run_dir)
        assert holder["host"] == socket.gethostname()
        status = run_status(run_dir, query_slurm=False)
        assert status["state"] == "running", status  # log.stall_minutes=0: the heartbeat is written anyway
        assert status["writer"]["pid"] == holder["pid"] and status["lease"]["host"] == holder["host"]
        logged = len(read_metrics(run_dir))

        second = run_training(1, over, launcher="python", check=False)
        assert second.returncode == EXIT_RUN_DIR_BUSY, second.stdout[-2000:] + second.stderr[-3000:]
        assert f"in use by another run: host {holder['host']} pid {holder['pid']}" in second.stderr
        assert len(read_metrics(run_dir)) == logged and read_lease(run_dir)["token"] == holder["token"]
    finally:
        kill_group(first)  # SIGKILL: launcher and both ranks, no clean exit

    status = run_status(run_dir, query_slurm=False)
    assert status["state"] == "crashed", status
    assert f"pid {holder['pid']}" in status["reason"] and "is gone" in status["reason"]

    third = run_training(2, over)
    out = third.stdout + third.stderr
    assert f"took over {run_dir} from host {holder['host']} pid {holder['pid']}" in out, out[-3000:]
    takeovers = [e for e in read_jsonl(os.path.join(run_dir, "events.jsonl")) if e["event"] == "lease_takeover"]
    assert len(takeovers) == 1 and "is gone" in takeovers[0]["reason"]
    assert takeovers[0]["previous"]["pid"] == holder["pid"]
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1)), steps  # steps 5.. logged before the kill were rewound, not doubled
    ref, got = losses_by_step(ref_dir), losses_by_step(run_dir)
    assert all(abs(ref[s] - got[s]) <= 1e-9 * max(1.0, abs(ref[s])) for s in ref), (ref, got)
    assert read_lease(run_dir) is None  # released at the clean finish
    assert run_status(run_dir, query_slurm=False)["state"] == "finished"


def test_usr1_checkpoints_releases_and_status_says_preempted(demo_root, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = start_training(1, _overrides(demo_root, run_dir), launcher="python",
                          extra_env={"DIT_FAULT_PAUSE_AFTER_CHECKPOINT": "4:5"})
    try:
        _paused_at_checkpoint(run_dir, proc)
        os.killpg(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert read_lease(run_dir) is None
    status = run_status(run_dir, query_slurm=False)
    assert status["state"] == "preempted", status
    assert status["last_checkpoint"]["tag"] == "step00000004" and status["last_checkpoint"]["verified"]
