"""What the Slurm tests share: the cluster fixture, bounded waits that fail with the job's output, job submission,
the reference run, and the per-node helpers of the two-node tests.

The cluster: ``../shared/slurm/start.sh`` (or ``$SLURM_DIR/start.sh``) with ``SLURM_NODES=2 SLURM_CPUS_PER_NODE=2``:
node1 and node2, each slurmd in its own network namespace and hostname, two CPUs each (Slurm's bookkeeping; the
machine has two cores, which ``config_overrides`` allows). One-node jobs (``--nodes=1 --ntasks-per-node=2``) and
two-node jobs (``--nodes=2 --ntasks-per-node=1``) both fit, so every Slurm test runs on one cluster, and a job that
loses node2 can be resubmitted on node1 with the same two ranks (the same data-parallel size). .ci/run starts that
cluster; the fixture starts or switches to it where it is not up (root only) and skips with the reason otherwise.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
STEPS = 60
# Same config for the reference and the preempted run; the checkpoint cadence is part of the config
# (equal for both) and kept sparse so the preemption checkpoint is the one the resume uses.
TRAIN_OVERRIDES = f"train.max_steps={STEPS} log.every=1 checkpoint.every=25 log.wandb.mode=offline"
CPU_ALLOC = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none"]
CLUSTER_ENV = {"SLURM_NODES": "2", "SLURM_CPUS_PER_NODE": "2"}
NODES = ("node1", "node2")


# --------------------------------------------------------------------------- cluster


def start_script() -> str | None:
    candidates = [os.path.normpath(os.path.join(REPO, "..", "shared", "slurm", "start.sh"))]
    if os.environ.get("SLURM_DIR"):
        candidates.append(os.path.join(os.environ["SLURM_DIR"], "start.sh"))
    return next((c for c in candidates if os.path.isfile(c)), None)


def slurm_up() -> bool:
    if not shutil.which("scontrol"):
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "is UP" in out


def node_cpus() -> dict[str, int]:
    """{node: CPUs} of the running cluster ({} when none)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {n: int(c) for n, c in (line.split() for line in out.splitlines() if len(line.split()) == 2)}


def cluster_fits() -> bool:
    cpus = node_cpus()
    return set(cpus) == set(NODES) and all(c >= 2 for c in cpus.values())


def run_start(extra_env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", start_script()], env=dict(os.environ, **extra_env), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="session")
def slurm():
    """The two-node cluster, for the whole session (one-node and two-node jobs share it)."""
    was_up = slurm_up()
    previous = node_cpus() if was_up else {}
    script = start_script()
    if script is not None and os.geteuid() == 0:
        proc = run_start(CLUSTER_ENV)  # idempotent; also brings back a node or slurmd an earlier run left down
        if proc.returncode != 0:
            pytest.skip(f"local Slurm could not start two nodes: {(proc.stderr or proc.stdout)[-1500:]}")
    elif not (was_up and cluster_fits() and shutil.which("sbatch")):
        pytest.skip("needs a Slurm cluster of node1 and node2 with 2 CPUs each: `SLURM_NODES=2 SLURM_CPUS_PER_NODE=2 "
                    "../shared/slurm/start.sh` (as root), or this start script and root")
    if not cluster_fits():
        pytest.skip(f"the Slurm cluster is not node1+node2 with 2 CPUs each: {node_cpus()}")
    yield
    if script is None or os.geteuid() != 0:
        return
    if not was_up:
        subprocess.run(["bash", os.path.join(os.path.dirname(script), "stop.sh")], capture_output=True, timeout=120)
    elif set(previous) != set(NODES) and len(previous) == 1:
        run_start({"SLURM_NODES": "1"})  # it was the default one-node cluster: put it back


def node_state(node: str) -> str:
    out = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def restore_node(node: str) -> None:
    """Bring a node the test took down back into service (start.sh restarts its slurmd and network)."""
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=test: restoring"],
                   capture_output=True, timeout=30)
    proc = run_start(CLUSTER_ENV)
    assert proc.returncode == 0, f"start.sh could not bring {node} back:\n{proc.stderr[-3000:]}"
    wait_for(lambda: node_state(node) == "idle", 60, f"{node} idle again", lambda: node_state(node))


# --------------------------------------------------------------------------- jobs


def job_info(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def read_output(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return f"<no output file {path}>"


def wait_job(job_id: str, out_path: str, timeout: float, what: str, done=None) -> dict:
    """Poll `scontrol show job` until ``done(info)`` (default: a terminal state); fail with the output."""
    done = done or (lambda info: info.get("JobState") in TERMINAL)
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info and done(info):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], capture_output=True)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for job {job_id} to {what}; last state "
                         f"{info.get('JobState')} restarts {info.get('Restarts')}\n--- output\n{read_output(out_path)[-6000:]}")


def wait_for(predicate, timeout: float, what: str, on_fail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_fail()}")


def submit(script: str, out_path: str, env_extra: dict, sbatch_args=()) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    env.update(env_extra)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = ["sbatch", "--parsable", f"--output={out_path}", *sbatch_args, script]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {' '.join(cmd)}\n{proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def train_env(run_dir: str, demo_root: str, extra: str = "") -> dict:
    return {"CONFIG": "configs/tiny.yaml", "DS_CONFIG": "zero2.json", "RUN_DIR": run_dir,
            "OVERRIDES": f"data.root={demo_root} {TRAIN_OVERRIDES} {extra}".strip()}


@pytest.fixture(scope="session")
def reference_run(slurm, demo_root, tmp_path_factory):
    """An uninterrupted `sbatch cluster/train_xl.slurm` run: 2 CPU ranks on one node, 60 steps (the reference
    trajectory of every Slurm test, one-node and two-node)."""
    tmp = tmp_path_factory.mktemp("slurm_ref")
    run_dir, out = str(tmp / "run"), str(tmp / "job-%j.out")
    env = train_env(run_dir, demo_root)
    env.update({"WANDB_API_KEY": "0123456789abcdef-must-not-leak", "MY_SERVICE_TOKEN": "tok-must-not-leak"})
    job = submit("cluster/train_xl.slurm", out, env, CPU_ALLOC)
    out = out.replace("%j", job)
    info = wait_job(job, out, 180, "finish")
    return {"job": job, "run_dir": run_dir, "out": out, "info": info}


# --------------------------------------------------------------------------- ranks and nodes


def rank_record(run_dir: str, rank: int) -> dict | None:
    from trainer.rundir import rank_path, read_json

    return read_json(rank_path(run_dir, rank))


def node_of_pid(pid: int) -> str | None:
    """The Slurm node a process runs on: the node whose slurmd shares its UTS (hostname) namespace."""
    try:
        uts = os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None
    for node in NODES:
        try:
            with open(f"/run/slurm/slurmd-{node}.pid") as f:
                if os.readlink(f"/proc/{int(f.read().strip())}/ns/uts") == uts:
                    return node
        except (OSError, ValueError):
            continue
    return None


def rank_process(run_dir: str, rank: int, job: str, out: str) -> dict:
    """Rank ``rank``'s liveness record (pid, host) once it is running in job ``job``."""
    def found():
        rec = rank_record(run_dir, rank)
        return rec if rec and rec.get("slurm_job_id") == job and rec.get("state") == "running" else None
    return wait_for(found, 60, f"rank {rank}'s liveness record", lambda: read_output(out)[-3000:])


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def status_json(run_dir: str) -> dict:
    """`python -m trainer.status RUN_DIR --json`, the command users run."""
    proc = subprocess.run([sys.executable, "-m", "trainer.status", run_dir, "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]


def error_events(run_dir: str) -> list[dict]:
    from trainer.rundir import events_path, read_jsonl

    return [e for e in read_jsonl(events_path(run_dir)) if e.get("event") == "error"]


def history(run_dir: str) -> list[dict]:
    from trainer.rundir import LAUNCH_HISTORY, launch_dir, read_jsonl

    return read_jsonl(os.path.join(launch_dir(run_dir), LAUNCH_HISTORY))
