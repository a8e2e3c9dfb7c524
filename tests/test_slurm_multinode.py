"""Two real Slurm nodes (tests/slurm_support.py: node1 and node2, each slurmd in its own network namespace with its own
hostname and address), one rank on each: what a multi-node user meets.

- the default srun launcher and the deepspeed launcher each train exactly the one-node reference (same two ranks,
  same layout), and USR1 → requeue → resume across both nodes equals it too;
- a SIGSTOPped rank on node2 (a hung rank): the job is torn down within the hang timeout plus a few seconds, exit 7,
  with rank 1 on node2 named first in the log, events.jsonl and trainer.status; the last checkpoint is intact;
- a SIGKILLed rank on node2: it is named as the first failure, though its peer on node1 exits first;
- node2 lost (its network cut, every process on it killed, as in a power loss): the job is torn down naming node2's
  rank, and the same run resubmitted with --nodes=1 (two ranks on node1: the same data-parallel size) continues from
  the last checkpoint to the reference's losses;
- node2's Python environment resolving another DeepSpeed: pre-flight fails the job before any rank starts, naming
  node2.

The hang tests run with ``run.hang_timeout_minutes=0.3`` (18 s); TEARDOWN_GRACE=15 lets the launcher kill an srun
that waits for a lost node after 15 s.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from tests.runs import losses_by_step as losses
from tests.slurm_support import (CPU_ALLOC, STEPS, TERMINAL, TWO_NODES, error_events, history, job_info, node_of_pid,
                                 pid_alive, rank_process, rank_record, read_output, restore_node, status_json, submit,
                                 train_env, wait_for, wait_job)
from trainer.rundir import read_metrics as metrics

HANG_MINUTES = 0.3
HANG_SECONDS = HANG_MINUTES * 60
FAST = "log.wandb.mode=disabled log.peak_tflops=1"  # nothing on rank 0 alone between steps: only the ranks' maths


def _equal_to_reference(reference_run, run_dir, steps=STEPS):
    ref, got = losses(reference_run["run_dir"]), losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1)), sorted(got)
    bad = [(s, ref[s], got[s]) for s in got if abs(ref[s] - got[s]) > 1e-6 * max(1.0, abs(ref[s]))]
    assert not bad, f"loss differs from the one-node reference at (step, ref, got): {bad[:5]}"


def _ranks_on_nodes(run_dir: str, job: str) -> dict:
    where = {r: rank_record(run_dir, r) for r in (0, 1)}
    assert all(w and w["slurm_job_id"] == job for w in where.values()), where
    return {r: w["host"] for r, w in where.items()}


def _first_named(text: str) -> list[str]:
    """In every line that reports a hang or failure, the first `rank N on HOST` after the phrase."""
    out = []
    for line in text.splitlines():
        m = re.search(r"(no progress for \d+ s|training (?:FAILED|HUNG)[^:]*:|first failure:)(.*)", line)
        if m:
            named = re.search(r"rank \d+ on \S+?(?=:| |$)", m.group(2))
            out.append(named.group(0) if named else "")
    return out


# --------------------------------------------------------------------------- launchers and preemption


def test_two_nodes_srun_launcher_equals_one_node_run(reference_run, demo_root, tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job-%j.out")
    job = submit("cluster/train_xl.slurm", out, train_env(run_dir, demo_root, FAST), TWO_NODES)
    out = out.replace("%j", job)
    info = wait_job(job, out, 240, "finish")
    text = read_output(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    assert f"job {job} attempt 0 (SLURM_RESTART_COUNT): 2 node(s) node1,node2 x 1 rank(s) = world 2 (CPU), " \
           f"launcher srun, master node1:" in text, text[-3000:]
    assert _ranks_on_nodes(run_dir, job) == {0: "node1", 1: "node2"}
    assert re.search(r"^\d: \[health node1\] ok", text, re.M) and re.search(r"^\d: \[health node2\] ok", text, re.M)
    _equal_to_reference(reference_run, run_dir)


def test_two_nodes_deepspeed_launcher_preempted_requeued_equals_one_node_run(reference_run, demo_root, tmp_path):
    """LAUNCHER=deepspeed (one `deepspeed --no_ssh --node_rank` per node, generated hostfile), USR1 mid-run:
    checkpoint on both nodes, exit 75, requeue, resume on both nodes; every loss equals the one-node reference."""
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job-%j.out")
    env = dict(train_env(run_dir, demo_root, FAST), LAUNCHER="deepspeed")
    job = submit("cluster/train_xl.slurm", out, env, TWO_NODES)
    out = out.replace("%j", job)
    wait_for(lambda: len(metrics(run_dir)) >= 8 or job_info(job).get("JobState") in TERMINAL, 180,
             "8 logged steps", lambda: read_output(out)[-4000:])
    assert len(metrics(run_dir)) < STEPS, "run finished before the signal could be sent"
    sig = subprocess.run(["scancel", "--batch", "--signal=USR1", job], capture_output=True, text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr
    info = wait_job(job, out, 240, "requeue and finish",
                    lambda i: i.get("JobState") in TERMINAL and (int(i.get("Restarts", "0")) >= 1 or
                                                                 "requeueing" not in read_output(out)))
    text = read_output(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text[-6000:]
    assert "launcher deepspeed" in text and f"job {job} attempt 1 (SLURM_RESTART_COUNT): 2 node(s) node1,node2" in text
    assert open(os.path.join(run_dir, "launch", f"hostfile-{job}-0")).read() == "node1 slots=1\nnode2 slots=1\n"
    assert re.search(r"^0: .*\[preemption\] received SIGUSR1", text, re.M), text[-5000:]
    assert re.search(r"^1: .*\[preemption\] received SIGUSR1", text, re.M), text[-5000:]
    m = re.search(r"preempted \(SIGUSR1\) at step (\d+)", text)
    assert m and f"resumed from {run_dir}/checkpoints/step{int(m.group(1)):08d} at step {m.group(1)}" in text
    assert [(h["restart"], h["outcome"]) for h in history(run_dir)] == [(0, "preempted"), (1, "finished")]
    assert _ranks_on_nodes(run_dir, job) == {0: "node1", 1: "node2"}  # the resumed attempt, on both nodes again
    _equal_to_reference(reference_run, run_dir)


# --------------------------------------------------------------------------- failures


def _last_checkpoint_intact(run_dir: str) -> str:
    from trainer.state.checkpoint import find_resumable, verify_checkpoint

    tag = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    ckpt = os.path.join(run_dir, "checkpoints", tag)
    assert find_resumable(os.path.join(run_dir, "checkpoints")) == ckpt
    assert verify_checkpoint(ckpt, deep=True) is None
    return tag


def test_sigstopped_rank_on_node2_is_torn_down_within_the_hang_timeout(slurm, demo_root, tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job-%j.out")
    env = dict(train_env(run_dir, demo_root, f"{FAST} train.max_steps=5000 checkpoint.every=10 "
                                             f"run.hang_timeout_minutes={HANG_MINUTES}"), TEARDOWN_GRACE="15")
    job = submit("cluster/train_xl.slurm", out, env, TWO_NODES)
    out = out.replace("%j", job)
    latest = os.path.join(run_dir, "checkpoints", "latest")
    wait_for(lambda: os.path.exists(latest) and open(latest).read().strip() >= "step00000020"
             or job_info(job).get("JobState") in TERMINAL, 180, "the step-20 checkpoint", lambda: read_output(out)[-4000:])
    rec = rank_process(run_dir, 1, job, out)
    assert rec["host"] == "node2" and node_of_pid(rec["pid"]) == "node2", rec
    os.kill(rec["pid"], signal.SIGSTOP)
    stopped = time.monotonic()
    info = wait_job(job, out, HANG_SECONDS + 90, "be torn down after the hang")
    elapsed = time.monotonic() - stopped
    print(f"\n[hang] SIGSTOP on rank 1 (node2) -> job {info['JobState']} after {elapsed:.1f} s "
          f"(run.hang_timeout_minutes={HANG_MINUTES} = {HANG_SECONDS:.0f} s)")
    text = read_output(out)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "7:0" and info["Restarts"] == "0", text[-6000:]
    assert elapsed <= HANG_SECONDS + 15, f"torn down {elapsed:.1f} s after the SIGSTOP\n{text[-4000:]}"
    # The log: the rank that noticed names the stuck rank and its node first; the launcher's last word does too.
    named = _first_named(text)
    assert named and set(named) == {"rank 1 on node2"}, (named, text[-5000:])
    assert re.search(r"^0: error: \[rank 0 on node1\] HANG \(.*\): no progress for 18 s \(run.hang_timeout_minutes\): "
                     r"rank 1 on node2: no sign of life", text, re.M), text[-5000:]
    assert re.search(r"^error: training HUNG, no progress for 18 s \(run.hang_timeout_minutes\): rank 1 on node2: ",
                     text, re.M), text[-5000:]
    # events.jsonl: one error event, the hang, rank 1 on node2 first.
    errors = error_events(run_dir)
    assert [(e["kind"], e["first_rank"], e["first_host"]) for e in errors] == [("hang", 1, "node2")], errors
    # trainer.status, from the run directory alone.
    status = status_json(run_dir)
    assert status["state"] == "hung" and "HUNG" in status["flags"], status
    assert re.match(r"no progress for 18 s \(run.hang_timeout_minutes\): rank 1 on node2: ", status["reason"]), status
    assert status["failure"]["first_rank"] == 1 and status["failure"]["first_host"] == "node2"
    last = history(run_dir)[-1]
    assert (last["outcome"], last["exit_code"], last["failed"][0]["task"], last["failed"][0]["node"]) == \
        ("hung", 7, 1, "node2"), last
    _last_checkpoint_intact(run_dir)
    wait_for(lambda: not pid_alive(rec["pid"]), 30, "the stopped rank to be gone")


def test_sigkilled_rank_on_node2_is_named_as_the_first_failure(slurm, demo_root, tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job-%j.out")
    env = train_env(run_dir, demo_root, f"{FAST} train.max_steps=5000 checkpoint.every=10")
    job = submit("cluster/train_xl.slurm", out, env, TWO_NODES)
    out = out.replace("%j", job)
    latest = os.path.join(run_dir, "checkpoints", "latest")
    wait_for(lambda: os.path.exists(latest) or job_info(job).get("JobState") in TERMINAL, 180,
             "a first checkpoint", lambda: read_output(out)[-4000:])
    rec = rank_process(run_dir, 1, job, out)
    assert rec["host"] == "node2" and node_of_pid(rec["pid"]) == "node2", rec
    os.kill(rec["pid"], signal.SIGKILL)
    info = wait_job(job, out, 120, "fail")
    text = read_output(out)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0" and info["Restarts"] == "0", text[-5000:]
    assert re.search(r"^error: training FAILED: rank 1 on node2: Killed \(its connections dropped, no error of its own "
                     r".*\); after it: rank 0 on node1 \(.*Connection (reset|closed) by peer", text, re.M), text[-5000:]
    assert set(_first_named(text)) == {"rank 1 on node2"}, (_first_named(text), text[-5000:])
    errors = error_events(run_dir)
    assert [(e["kind"], e["first_rank"], e["first_host"]) for e in errors] == [("rank_failure", 1, "node2")], errors
    status = status_json(run_dir)
    assert status["state"] == "crashed" and status["reason"].startswith("first failure: rank 1 on node2: "), status
    last = history(run_dir)[-1]
    assert (last["outcome"], last["failed"][0]["task"], last["failed"][0]["node"]) == ("failed", 1, "node2"), last
    _last_checkpoint_intact(run_dir)


def test_version_mismatch_on_node2_fails_preflight_naming_it(slurm, demo_root, tmp_path):
    """node2's Python resolves `deepspeed` to another install (0.0.1+node2). Simulated with a sitecustomize.py on
    PYTHONPATH that, only where the hostname is node2, puts a folder holding that install (a `deepspeed` package
    and its dist-info metadata, as pip lays them out) first on sys.path; node1 sees the real one."""
    site, node2_site = tmp_path / "site", tmp_path / "node2-site"
    (node2_site / "deepspeed").mkdir(parents=True)
    (node2_site / "deepspeed" / "__init__.py").write_text("raise ImportError('DeepSpeed 0.0.1+node2 is broken')\n")
    (node2_site / "deepspeed-0.0.1+node2.dist-info").mkdir()
    (node2_site / "deepspeed-0.0.1+node2.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.0.1+node2\n")
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import socket, sys\nif socket.gethostname() == 'node2':\n    sys.path.insert(0, {str(node2_site)!r})\n")
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job-%j.out")
    env = dict(train_env(run_dir, demo_root, FAST), PYTHONPATH=str(site))
    t0 = time.monotonic()
    job = submit("cluster/train_xl.slurm", out, env, TWO_NODES)
    out = out.replace("%j", job)
    info = wait_job(job, out, 90, "fail in pre-flight")
    text = read_output(out)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "4:0", text[-4000:]
    assert time.monotonic() - t0 < 90
    assert re.search(r"^error: pre-flight: the nodes differ: node node2: deepspeed 0\.0\.1\+node2 from "
                     rf"{re.escape(str(node2_site))}/deepspeed \(node node1: \d+\.\d+\.\d+\)\. Nothing was started", text,
                     re.M), text[-4000:]
    assert "node node1: deepspeed" not in text.split("the nodes differ:")[1].split("(")[0]
    assert "starting 2 rank(s)" not in text and not os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
    assert history(run_dir)[-1]["outcome"] == "health_check_failed"


# --------------------------------------------------------------------------- node loss


def test_node_loss_then_one_node_resubmission_continues_from_the_last_checkpoint(reference_run, demo_root, tmp_path):
    """node2 lost as in a power loss: its network is cut first (no reset reaches node1: the peer just goes silent)
    and then every process on it is killed (slurmd, step daemon, rank 1). Rank 0 finds rank 1 silent after the hang
    timeout and ends the job naming it; srun waits for the lost node, so the launcher kills it after TEARDOWN_GRACE
    and node1 is free. node2 is then marked DOWN by hand (what Slurm does itself after SlurmdTimeout, 60 s here,
    300 s by default), and the same run is resubmitted with --nodes=1: two ranks on node1, the same data-parallel
    size, so the checkpoint loads as is (trainer/config/resume.py), and the run ends on the reference's losses."""
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job-%j.out")
    overrides = f"{FAST} checkpoint.every=10 run.hang_timeout_minutes={HANG_MINUTES}"
    env = dict(train_env(run_dir, demo_root, f"{overrides} train.max_steps=5000"), TEARDOWN_GRACE="15")
    job = submit("cluster/train_xl.slurm", out, env, TWO_NODES)
    out = out.replace("%j", job)
    latest = os.path.join(run_dir, "checkpoints", "latest")
    try:
        wait_for(lambda: os.path.exists(latest) and open(latest).read().strip() >= "step00000020"
                 or job_info(job).get("JobState") in TERMINAL, 180, "the step-20 checkpoint",
                 lambda: read_output(out)[-4000:])
        rec = rank_process(run_dir, 1, job, out)
        assert rec["host"] == "node2" and node_of_pid(rec["pid"]) == "node2", rec
        subprocess.run(["ip", "netns", "exec", "slurm-node2", "ip", "link", "set", "eth0", "down"], check=True)
        pids = subprocess.run(["ip", "netns", "pids", "slurm-node2"], capture_output=True, text=True).stdout.split()
        subprocess.run(["kill", "-9", *pids], check=False)
        lost = time.monotonic()
        wait_for(lambda: "error: training HUNG" in read_output(out), HANG_SECONDS + 60, "the launcher's verdict",
                 lambda: read_output(out)[-5000:])
        print(f"\n[node loss] job {job} torn down {time.monotonic() - lost:.1f} s after node2 was lost")
        wait_for(lambda: job_info(job).get("JobState") in TERMINAL | {"COMPLETING"}, 30, "the batch script's end")
        text = read_output(out)
        assert re.search(r"^error: training HUNG, no progress for 18 s \(run.hang_timeout_minutes\): rank 1 on node2: "
                         r".*no sign of life", text, re.M), text[-5000:]
        # srun waited for the lost node; the launcher killed it TEARDOWN_GRACE after rank 0's exit
        assert "srun has not ended 15 s after the first task ended (a node that no longer answers?): killing the step" \
            in text and set(_first_named(text)) == {"rank 1 on node2"}, text[-5000:]
        tag = _last_checkpoint_intact(run_dir)
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=DOWN", "Reason=test: node lost"], check=True)
        # The same run on the one node left: two ranks on node1.
        out2 = str(tmp_path / "resubmit-%j.out")
        job2 = submit("cluster/train_xl.slurm", out2, train_env(run_dir, demo_root, overrides), CPU_ALLOC)
        out2 = out2.replace("%j", job2)
        info = wait_job(job2, out2, 240, "resume on one node and finish")
        text2 = read_output(out2)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text2[-6000:]
        assert f"job {job2} attempt 0 (SLURM_RESTART_COUNT): 1 node(s) node1 x 2 rank(s) = world 2" in text2
        step = int(tag[4:])
        assert f"resumed from {run_dir}/checkpoints/{tag} at step {step}" in text2, text2[-5000:]
        assert _ranks_on_nodes(run_dir, job2) == {0: "node1", 1: "node1"}
        assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))  # no step logged twice
        _equal_to_reference(reference_run, run_dir)
    finally:
        restore_node("node2")
