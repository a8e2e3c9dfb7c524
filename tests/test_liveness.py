"""Liveness records, hang and failure verdicts (trainer/monitor/liveness.py, hang.py), the collective timeouts and the
NCCL settings: unit tests on hand-made records (times passed in, nothing sleeps), plus one real two-rank run whose
rank 1 is SIGSTOPped (tests/test_slurm_multinode.py does the same across two Slurm nodes)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from trainer.engine.distributed import DEFAULT_COLLECTIVE_TIMEOUT, collective_timeout, free_port
from trainer.monitor.hang import RankBeacon
from trainer.monitor.liveness import (beat_interval, classify_exception, diagnose_failure, diagnose_hang, peer_address,
                                      publish, ranks_at, read_records, read_verdict, settle_seconds)
from trainer.rundir import EXIT_HUNG, events_path, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOW = 1_800_000_000.0


def rec(rank, host, *, age=0.5, step=61, phase="backward", progress_age=20.0, failure=None, addrs=None):
    r = {"rank": rank, "world": 2, "host": host, "addrs": addrs or [], "pid": 100 + rank, "attempt": "tok",
         "slurm_job_id": "7", "slurm_restart": 0, "step": step, "micro": 0, "phase": phase,
         "progress_time": NOW - progress_age, "state": "running", "time": NOW - age}
    if failure:
        r["failure"] = failure
        r["state"] = "failed"
    return r


DETECTOR = {"rank": 0, "world": 2, "attempt": "tok", "slurm_job_id": "7", "slurm_restart": 0}


# --------------------------------------------------------------------------- hang verdicts


def test_hang_names_the_rank_without_sign_of_life_first():
    records = {0: rec(0, "node1"), 1: rec(1, "node2", age=19.0, phase="step", progress_age=19.5)}
    v = diagnose_hang(records, 2, NOW, 18.0, 1.0, DETECTOR)
    assert [(e["rank"], e["host"], e["role"]) for e in v["ranks"]] == [(1, "node2", "first"), (0, "node1", "then")]
    assert v["message"].startswith("no progress for 18 s (run.hang_timeout_minutes): rank 1 on node2: no sign of "
                                   "life for 19 s")
    assert "then rank 0 on node1 (waiting at step 62 backward since" in v["message"]
    assert v["slurm_job_id"] == "7" and v["kind"] == "hang"


def test_hang_names_the_rank_behind_when_every_rank_is_alive():
    """Rank 1 stuck in its data loader at step 62; rank 0 waits in step 62's gradient reduction."""
    records = {0: rec(0, "node1", phase="backward"), 1: rec(1, "node2", phase="data")}
    v = diagnose_hang(records, 2, NOW, 18.0, 1.0, DETECTOR)
    assert [(e["rank"], e["role"]) for e in v["ranks"]] == [(1, "first"), (0, "then")]
    assert "rank 1 on node2: behind the others, no progress for 20 s at step 62 data" in v["message"]
    # One step behind is behind too, whatever the phase.
    records = {0: rec(0, "node1", step=62, phase="data"), 1: rec(1, "node2", step=61, phase="optimizer")}
    assert diagnose_hang(records, 2, NOW, 18.0, 1.0, DETECTOR)["ranks"][0]["rank"] == 1


def test_hang_with_every_rank_at_the_same_point_names_all_and_says_so():
    records = {0: rec(0, "node1"), 1: rec(1, "node2")}
    v = diagnose_hang(records, 2, NOW, 18.0, 1.0, DETECTOR)
    assert [e["role"] for e in v["ranks"]] == ["first", "first"] and "a collective that never completes" in v["message"]


def test_hang_names_a_rank_without_any_record():
    v = diagnose_hang({0: rec(0, "node1")}, 2, NOW, 18.0, 1.0, DETECTOR)
    assert v["ranks"][0]["rank"] == 1 and "no liveness record" in v["message"]


# --------------------------------------------------------------------------- failure verdicts


def test_failure_orders_ranks_by_time_of_death_or_first_error():
    records = {0: rec(0, "node1", failure={"time": NOW - 1, "kind": "peer", "message": "Connection reset by peer"}),
               1: rec(1, "node2", age=6.0),  # silent before the peer error was seen
               2: rec(2, "node3", failure={"time": NOW - 3, "kind": "error", "message": "ValueError: bad"}),
               3: rec(3, "node4", age=0.2)}  # wrote a record after it: alive
    v = diagnose_failure(records, 4, NOW, NOW - 1.5, 1.0, DETECTOR)
    assert [(e["rank"], e["role"]) for e in v["ranks"]] == [(1, "first"), (2, "first"), (0, "then"), (3, "then")]
    assert v["message"].startswith("rank 1 on node2: no sign of life since")
    assert "rank 2 on node3: ValueError: bad" in v["message"]


def test_failure_names_the_peer_a_dropped_connection_led_to_without_waiting():
    records = {0: rec(0, "node1", addrs=["10.231.0.11"]), 1: rec(1, "node2", addrs=["10.231.0.12"])}
    text = "[/x/pair.cc:537] Read error [10.231.0.12]:45994: Connection reset by peer"
    assert ranks_at(records, peer_address(text)) == [1] and ranks_at(records, "10.9.9.9") == []
    v = diagnose_failure(records, 2, NOW, None, 1.0, DETECTOR, suspects=[1])
    assert v["ranks"][0]["rank"] == 1 and v["message"].startswith("rank 1 on node2: its connections dropped")


def test_failure_of_the_detector_alone_names_it():
    """Nobody died and nobody else raised: the broken connection itself comes first, as its detector saw it."""
    records = {0: rec(0, "node1", failure={"time": NOW - 1, "kind": "peer", "message": "Connection closed"}),
               1: rec(1, "node2", age=0.1)}
    v = diagnose_failure(records, 2, NOW, NOW - 1.0, 1.0, DETECTOR)
    assert [(e["rank"], e["role"]) for e in v["ranks"]] == [(0, "first"), (1, "then")]


class DistBackendError(RuntimeError):
    pass


@pytest.mark.parametrize("exc, kind", [
    (RuntimeError("[/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 18000ms for recv operation"), "timeout"),
    (RuntimeError("[/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:1: Connection reset by peer"), "peer"),
    (DistBackendError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE)"), "timeout"),
    (DistBackendError("NCCL error: remote process exited or there was a network error"), "peer"),
    (TimeoutError("DataLoader timed out after 30 seconds"), None),  # not a collective
    (ValueError("bad shape"), None),
])
def test_classify_exception(exc, kind):
    assert classify_exception(exc) == kind


def test_publish_once_with_one_error_event(tmp_path):
    run = str(tmp_path)
    first = diagnose_hang({0: rec(0, "node1"), 1: rec(1, "node2", age=30)}, 2, NOW, 18.0, 1.0, DETECTOR)
    second = diagnose_hang({0: rec(0, "node1", age=30), 1: rec(1, "node2")}, 2, NOW, 18.0, 1.0, dict(DETECTOR, rank=1))
    assert publish(run, first, step=61) is True
    assert publish(run, second, step=61) is False  # the first verdict of the attempt stands
    assert read_verdict(run)["ranks"][0]["rank"] == 1
    assert read_verdict(run, job=("7", 0)) is not None and read_verdict(run, job=("7", 1)) is None
    errors = [e for e in read_jsonl(events_path(run)) if e["event"] == "error"]
    assert [(e["kind"], e["first_rank"], e["first_host"], e["step"]) for e in errors] == [("hang", 1, "node2", 61)]
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]


# --------------------------------------------------------------------------- the beacon


def test_beacon_arms_at_the_first_step_and_fires_once(tmp_path):
    clock = [NOW]
    fired = []
    b = RankBeacon(str(tmp_path), 1, 2, "tok", 18.0, on_hang=fired.append, clock=lambda: clock[0],
                   environ={"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2"})
    assert b.interval == beat_interval(18.0) == 1.0
    clock[0] += 60
    assert b.check() is False and not fired  # set-up (not armed): covered by the collective timeout
    b.progress(5)
    b.enter("data")
    clock[0] += 10
    assert b.check() is False
    clock[0] += 9
    assert b.check() is True and fired == [b]
    clock[0] += 30
    b.check()
    assert fired == [b]  # once
    got = read_records(str(tmp_path), job=("7", 2))[1]
    assert (got["step"], got["phase"], got["time"], got["host"]) == (5, "data", clock[0], b.record["host"])
    assert read_records(str(tmp_path), attempt="other") == {}
    b.fail("peer", "Connection reset by peer")
    assert read_records(str(tmp_path))[1]["failure"]["kind"] == "peer"


def test_beat_interval_and_settle_fit_slurms_killwait():
    assert beat_interval(30 * 60) == 5.0 and beat_interval(18) == 1.0 and beat_interval(0) == 5.0
    assert settle_seconds(5.0) == 8.0 < 10  # a rank that lost a peer decides before srun's KillWait ends it (10 s here)


def test_collective_timeout_is_the_hang_timeout_on_gloo_and_longer_on_nccl():
    assert collective_timeout("gloo", 18.0) == 18.0
    assert collective_timeout("nccl", 1800.0) == 1800.0 + 180.0  # the trainer's watchdog names the stuck rank first
    assert collective_timeout("nccl", 18.0) == 48.0
    assert collective_timeout("gloo", 0) == collective_timeout("nccl", 0) == DEFAULT_COLLECTIVE_TIMEOUT


def test_nccl_env_settings():
    """cluster/nccl.env: asynchronous error handling on (tear down on a timeout), the flight recorder on so the
    timeout dump has content, no deprecated names, and a value exported before sbatch wins."""
    def sourced(**pre):
        env = {"PATH": os.environ["PATH"], **pre}
        out = subprocess.run(["bash", "-c", f"source {REPO}/cluster/nccl.env && env"], env=env, capture_output=True,
                             text=True, check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    env = sourced()
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["TORCH_NCCL_BLOCKING_WAIT"] == "0"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
    assert env["TORCH_NCCL_ENABLE_MONITORING"] == "1" and int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) > 0
    assert not {"NCCL_ASYNC_ERROR_HANDLING", "NCCL_BLOCKING_WAIT"} & set(env)
    assert sourced(TORCH_NCCL_ASYNC_ERROR_HANDLING="3")["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


# --------------------------------------------------------------------------- a real hang, two local ranks


def test_stopped_rank_ends_the_run_with_exit_7_naming_it(demo_root, tmp_path):
    """Two plain processes (no launcher: nothing else tears anything down), rank 1 SIGSTOPped after its step-10
    checkpoint: rank 0 exits 7 within the hang timeout plus a few seconds, and the verdict names rank 1."""
    run_dir, hang = str(tmp_path / "run"), 15.0
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               LOCAL_WORLD_SIZE="2")
    cmd = [sys.executable, os.path.join(REPO, "trainer", "main.py"), "--config", os.path.join(REPO, "configs", "tiny.yaml"),
           f"run.dir={run_dir}", f"data.root={demo_root}", "train.max_steps=5000", "checkpoint.every=10",
           f"run.hang_timeout_minutes={hang / 60}", "log.wandb.mode=disabled", "log.peak_tflops=1"]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        latest = os.path.join(run_dir, "checkpoints", "latest")
        deadline = time.monotonic() + 240
        while not (os.path.exists(latest) and open(latest).read().strip() >= "step00000010"):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                "no step-10 checkpoint:\n" + "".join(p.communicate(timeout=30)[0][-3000:] for p in procs if p.poll() is not None)
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        out0, _ = procs[0].communicate(timeout=hang + 60)
        elapsed = time.monotonic() - stopped
    finally:
        for p in procs:
            p.kill()
            p.communicate(timeout=30)
    assert procs[0].returncode == EXIT_HUNG, out0[-4000:]
    assert elapsed <= hang + 10, f"rank 0 ended {elapsed:.1f} s after the SIGSTOP\n{out0[-3000:]}"
    verdict = json.load(open(os.path.join(run_dir, "failure.json")))
    assert verdict["kind"] == "hang" and verdict["detected_by"] == 0
    assert [(e["rank"], e["role"]) for e in verdict["ranks"]] == [(1, "first"), (0, "then")], verdict
    assert "rank 1 on" in out0 and "HANG" in out0


def test_behind_follows_the_order_of_a_step():
    """A rank that finished step 5 (checkpointing) is ahead of one still computing step 5, and behind one computing
    step 6; a later micro-step is ahead; set-up comes before the first step."""
    from trainer.monitor.liveness import _order_key

    def key(step, phase, micro=0):
        return _order_key({"step": step, "phase": phase, "micro": micro})

    assert key(4, "backward") < key(5, "step") < key(5, "checkpoint") < key(5, "data") < key(5, "optimizer")
    assert key(4, "forward", micro=0) < key(4, "data", micro=1)
    assert key(0, "setup") < key(0, "monitor") < key(0, "stage") < key(0, "data")
    assert key(120, "monitor") < key(120, "data")  # resumed at step 120
