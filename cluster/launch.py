"""Batch-side launcher for the Slurm scripts: ``python -m cluster.launch`` (the batch shell ``exec``s it).

One job attempt, in order:

1. read the allocation (nodes, tasks per node, GPUs, CPUs per task) and the run settings from the
   environment (``CONFIG``, ``DS_CONFIG``, ``RUN_DIR``, ``OVERRIDES``, ``LAUNCHER``, ...);
2. resolve the run config (a bad key fails here, in seconds, with the key named) and write the
   launch record into ``RUN_DIR/launch/``: the resolved config, the launch environment (secrets
   dropped), the hostfile and the exact command, tagged ``<jobid>-<restart>``;
3. health checks (``cluster.health_check``): once per node (GPUs, shared run dir, and the Python, torch,
   DeepSpeed and project versions, which must be equal on every node) and once per job (the trainer's
   ``--validate_only`` with the job's world size);
4. start the ranks: ``srun`` one task per GPU (default) or ``deepspeed --no_ssh`` once per node;
5. forward preemption signals: USR1 (``--signal=B:USR1@secs`` or ``scancel --batch --signal=USR1``)
   or TERM reaching this process is sent on as USR1 to the srun step, which delivers it to every
   process of every task; the trainer checkpoints at the next step boundary and exits 75; and end a
   step that should be over (cluster/step_runner.py: a lost node, every rank frozen);
6. classify the end (cluster/outcome.py): 0 → done; 75 from the ranks → ``scontrol requeue
   $SLURM_JOB_ID`` (the requeued attempt resumes from the checkpoint); 7 → hung, the stuck rank named
   (requeued only with ``run.requeue_on_hang=true``); anything else → name the rank that failed first,
   exit non-zero so the job is FAILED, and leave the checkpoints alone.

Kept free of training logic: it only reads the config to learn ``run.dir`` and record it.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.engine.launch_env import hostnames, parse_tasks_per_node, port_for_job  # noqa: E402
from trainer.rundir import (EXIT_CONFIG_ERROR, EXIT_HUNG, EXIT_LAUNCH_ERROR, EXIT_PREEMPTED,  # noqa: E402,F401  (one exit-code table)
                            atomic_write_text, launch_dir)

from cluster.launch_record import LaunchError, append_history, capture_env, format_env, log, make_hostfile  # noqa: E402,F401
from cluster.outcome import Outcome, TaskEnd, classify, parse_srun_line  # noqa: E402,F401
from cluster.health_check import compare_nodes, read_records as read_preflight  # noqa: E402
from cluster.step_runner import StepRunner, silence_watch  # noqa: E402,F401
from trainer.monitor.liveness import read_verdict  # noqa: E402  (torch-free)


# --------------------------------------------------------------------------- allocation


@dataclass
class Allocation:
    job_id: str
    restart: int
    nodes: list[str]
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: Optional[int]

    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.tasks_per_node

    @property
    def master_addr(self) -> str:
        return self.nodes[0]

    @property
    def master_port(self) -> int:
        return port_for_job(self.job_id, restart=self.restart)

    @property
    def tag(self) -> str:
        return f"{self.job_id}-{self.restart}"


def _int(environ: Mapping[str, str], name: str) -> Optional[int]:
    raw = (environ.get(name) or "").strip()
    if not raw:
        return None
    m = re.match(r"^(?:[A-Za-z0-9_]+:)*(\d+)", raw)  # SLURM_GPUS_PER_NODE may read "a100:8"
    if not m:
        raise LaunchError(f"cannot read {name}={raw!r} as a number")
    return int(m.group(1))


def gpus_on_node(environ: Mapping[str, str]) -> int:
    """GPUs Slurm gave this node (0 when none were requested)."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = _int(environ, name)
        if value is not None:
            return value
    return 0


def allocation_from_env(environ: Mapping[str, str], resolve_hosts=hostnames) -> Allocation:
    """Read the job's allocation; processes per node come from it (one per GPU, or the CPU task count)."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        raise LaunchError("SLURM_JOB_ID is not set: submit with `sbatch cluster/train.slurm` "
                          "(or use `deepspeed trainer/main.py ...` on one machine)")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
    nodes = resolve_hosts(nodelist) if nodelist else []
    if not nodes:
        raise LaunchError(f"cannot read the node list SLURM_JOB_NODELIST={nodelist!r}")
    gpus = gpus_on_node(environ)
    ppn = _int(environ, "SLURM_NTASKS_PER_NODE")
    if ppn is None:
        counts = parse_tasks_per_node(environ.get("SLURM_TASKS_PER_NODE", ""))
        if counts and len(set(counts)) > 1:
            raise LaunchError(f"uneven tasks per node SLURM_TASKS_PER_NODE={environ.get('SLURM_TASKS_PER_NODE')}; "
                              f"submit with --ntasks-per-node so every node runs the same number of ranks")
        ppn = counts[0] if counts else None
        if gpus and (ppn is None or ppn == 1):
            ppn = gpus  # --gpus-per-node without --ntasks-per-node: one rank per GPU
    if not ppn:
        ppn = 1
    if gpus and ppn != gpus:
        raise LaunchError(f"{ppn} task(s) per node but {gpus} GPU(s) per node: the launcher runs one rank per GPU; "
                          f"submit with --ntasks-per-node={gpus} (or ask for {ppn} GPUs per node)")
    return Allocation(job_id=job_id, restart=_int(environ, "SLURM_RESTART_COUNT") or 0, nodes=nodes,
                      tasks_per_node=ppn, gpus_per_node=gpus, cpus_per_task=_int(environ, "SLURM_CPUS_PER_TASK"))


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    config: str
    ds_config: str
    run_dir: Optional[str]
    overrides: list[str]
    launcher: str
    health_check: bool
    srun_args: list[str]
    max_restarts: int
    python: str
    script: str = "trainer/main.py"
    extra: dict = field(default_factory=dict)


def settings_from_env(environ: Mapping[str, str]) -> Settings:
    config = environ.get("CONFIG", "").strip()
    if not config:
        raise LaunchError("CONFIG is not set: pass CONFIG=configs/<run>.yaml (e.g. `CONFIG=configs/tiny.yaml sbatch ...`)")
    launcher = environ.get("LAUNCHER", "srun").strip().lower() or "srun"
    if launcher not in ("srun", "deepspeed"):
        raise LaunchError(f"LAUNCHER={launcher!r}: use srun (default) or deepspeed")
    try:
        overrides = shlex.split(environ.get("OVERRIDES", ""))
        srun_args = shlex.split(environ.get("SRUN_ARGS", ""))
    except ValueError as exc:
        raise LaunchError(f"cannot split OVERRIDES/SRUN_ARGS: {exc}") from None
    for item in overrides:
        if "=" not in item:
            raise LaunchError(f"OVERRIDES item {item!r} is not key=value")
    return Settings(config=config, ds_config=environ.get("DS_CONFIG", "zero2.json").strip() or "zero2.json",
                    run_dir=(environ.get("RUN_DIR") or "").strip() or None, overrides=overrides, launcher=launcher,
                    health_check=environ.get("HEALTH_CHECK", "1").strip() not in ("0", "false", "no"),
                    srun_args=srun_args, max_restarts=int(environ.get("MAX_RESTARTS", "100") or 100),
                    python=environ.get("PYTHON") or sys.executable)


def resolve_run(settings: Settings) -> tuple[object, str, list[str]]:
    """(resolved config, absolute run dir, overrides for the ranks); ConfigError names the bad key."""
    from trainer.config.schema import load_config  # YAML + schema only: no torch, no process group

    overrides = list(settings.overrides)
    if settings.run_dir:
        overrides.append(f"run.dir={os.path.abspath(settings.run_dir)}")
    cfg = load_config(settings.config, overrides)
    run_dir = os.path.abspath(cfg.run.dir)
    if run_dir != cfg.run.dir:
        overrides.append(f"run.dir={run_dir}")  # every rank, whatever its cwd, writes the same place
        cfg.run.dir = run_dir
    return cfg, run_dir, overrides


# --------------------------------------------------------------------------- commands


def trainer_args(settings: Settings, overrides: list[str]) -> list[str]:
    return [settings.script, "--config", settings.config, "--ds_config", settings.ds_config, *overrides]


def srun_prefix(alloc: Allocation, ntasks_per_node: int, cpus_per_task: Optional[int], extra: list[str]) -> list[str]:
    cmd = ["srun", "--label", "--kill-on-bad-exit=1", "--unbuffered", f"--nodes={len(alloc.nodes)}",
           f"--ntasks={len(alloc.nodes) * ntasks_per_node}", f"--ntasks-per-node={ntasks_per_node}"]
    if cpus_per_task:  # Slurm >= 22.05: srun no longer inherits --cpus-per-task from sbatch
        cmd.append(f"--cpus-per-task={cpus_per_task}")
    return cmd + list(extra)


def build_train_command(alloc: Allocation, settings: Settings, overrides: list[str],
                        hostfile: Optional[str] = None) -> list[str]:
    if settings.launcher == "srun":
        return srun_prefix(alloc, alloc.tasks_per_node, alloc.cpus_per_task, settings.srun_args) + [
            settings.python, "-u", *trainer_args(settings, overrides)]
    # deepspeed: one launcher per node (no ssh/pdsh), each starting tasks_per_node ranks. The ranks
    # get the signal from the srun step directly; the launcher processes ignore USR1/TERM (an ignored
    # disposition survives exec) so they neither die of USR1 nor tear the ranks down mid-checkpoint.
    if hostfile is None:
        raise LaunchError("the deepspeed launcher needs a hostfile")
    cpus = alloc.cpus_per_task * alloc.tasks_per_node if alloc.cpus_per_task else None
    node_cmd = ('trap "" USR1 TERM; exec "$0" --node_rank="$SLURM_NODEID" "$@"')
    return srun_prefix(alloc, 1, cpus, settings.srun_args) + [
        "bash", "-c", node_cmd, "deepspeed", "--hostfile", hostfile, "--no_ssh",
        "--master_addr", alloc.master_addr, "--master_port", str(alloc.master_port),
        *trainer_args(settings, overrides)]


def preflight_folder(run_dir: str, alloc: Allocation) -> str:
    return os.path.join(launch_dir(run_dir), f"preflight-{alloc.tag}")


def health_check_commands(alloc: Allocation, settings: Settings, run_dir: str,
                          overrides: list[str]) -> list[tuple[str, list[str], dict]]:
    node = srun_prefix(alloc, 1, None, settings.srun_args) + [
        settings.python, "-m", "cluster.health_check", "node", "--run-dir", run_dir,
        "--gpus", str(alloc.gpus_per_node), "--record", preflight_folder(run_dir, alloc)]
    job = [settings.python, "-m", "cluster.health_check", "job", "--world-size", str(alloc.world_size),
           "--config", settings.config, "--ds_config", settings.ds_config, "--", *overrides]
    return [("per-node checks", node, {}), ("config, shards and layout", job, {})]


# --------------------------------------------------------------------------- running


def requeue(job_id: str) -> bool:
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"scontrol requeue {job_id} failed: {exc}")
        return False
    if proc.returncode != 0:
        log(f"scontrol requeue {job_id} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return False
    return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Launch one Slurm job attempt of trainer/main.py (used by cluster/*.slurm)")
    parser.add_argument("--dry-run", action="store_true", help="resolve and record everything, print the commands, start nothing")
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    runner = StepRunner(teardown_grace=float(environ.get("TEARDOWN_GRACE", "60") or 60))
    runner.install()  # before anything slow: a USR1 during start-up must not kill the batch shell
    started = time.time()
    try:
        settings = settings_from_env(environ)
        alloc = allocation_from_env(environ)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_LAUNCH_ERROR
    try:
        from trainer.config.schema import ConfigError
    except ImportError as exc:
        print(f"error: cannot import the trainer from {os.getcwd()} ({exc}); run from the repository "
              f"(REPO_DIR) with its environment active (VENV / ENV_SETUP)", file=sys.stderr, flush=True)
        return EXIT_LAUNCH_ERROR
    try:
        cfg, run_dir, overrides = resolve_run(settings)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR

    log(f"job {alloc.job_id} attempt {alloc.restart} (SLURM_RESTART_COUNT): {len(alloc.nodes)} node(s) "
        f"{','.join(alloc.nodes[:8])}{'...' if len(alloc.nodes) > 8 else ''} x {alloc.tasks_per_node} rank(s) = world "
        f"{alloc.world_size} ({'GPU' if alloc.gpus_per_node else 'CPU'}), launcher {settings.launcher}, "
        f"master {alloc.master_addr}:{alloc.master_port}")
    log(f"config {settings.config} + {settings.ds_config}; run dir {run_dir}")
    if alloc.restart > settings.max_restarts:
        print(f"error: job {alloc.job_id} was requeued {alloc.restart} times (MAX_RESTARTS={settings.max_restarts}); "
              f"not starting again. Checkpoints in {run_dir}/checkpoints are intact: resubmit to resume.",
              file=sys.stderr, flush=True)
        return EXIT_LAUNCH_ERROR

    launch_folder = launch_dir(run_dir)
    try:
        os.makedirs(launch_folder, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create run dir {launch_folder}: {exc}", file=sys.stderr, flush=True)
        return EXIT_LAUNCH_ERROR

    env = dict(environ)
    env.update({"MASTER_ADDR": alloc.master_addr, "MASTER_PORT": str(alloc.master_port), "PYTHONUNBUFFERED": "1"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # never leak a stale layout into the ranks
        env.pop(k, None)
    if alloc.cpus_per_task:
        env.setdefault("OMP_NUM_THREADS", str(alloc.cpus_per_task))
    # NCCL's dump of in-flight collectives on a timeout (cluster/nccl.env) goes to the shared run dir, per rank.
    env.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", os.path.join(launch_folder, f"nccl-trace-{alloc.tag}-rank"))
    repo = os.getcwd()
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    hostfile = None
    if settings.launcher == "deepspeed":
        hostfile = os.path.join(launch_folder, f"hostfile-{alloc.tag}")
        atomic_write_text(hostfile, make_hostfile(alloc.nodes, alloc.tasks_per_node))
    train_cmd = build_train_command(alloc, settings, overrides, hostfile)
    from trainer.config.schema import save_config

    save_config(cfg, os.path.join(launch_folder, f"config-{alloc.tag}.yaml"))
    atomic_write_text(os.path.join(launch_folder, f"env-{alloc.tag}.txt"), format_env(capture_env(env)))
    atomic_write_text(os.path.join(launch_folder, f"command-{alloc.tag}.sh"), shlex.join(train_cmd) + "\n")
    log(f"launch record in {launch_folder} (config-{alloc.tag}.yaml, env-{alloc.tag}.txt, command-{alloc.tag}.sh)")
    if args.dry_run:
        for name, cmd, _ in health_check_commands(alloc, settings, run_dir, overrides):
            print(f"# health check: {name}\n{shlex.join(cmd)}")
        print(f"# train\n{shlex.join(train_cmd)}")
        return 0

    record = {"job_id": alloc.job_id, "restart": alloc.restart, "nodes": alloc.nodes, "world_size": alloc.world_size,
              "launcher": settings.launcher, "start": started}
    if settings.health_check:
        for name, cmd, _ in health_check_commands(alloc, settings, run_dir, overrides):
            t0 = time.time()
            rc = runner.run(cmd, env=env, forward=False)
            if rc != 0:
                who = "; ".join(f"node {e.node}: {e.what}" for e in runner.ends) or f"exit status {rc}"
                msg = f"health check failed ({name}): {who}; see the 'error:' lines above. Nothing was started."
                print(f"error: {msg}", file=sys.stderr, flush=True)
                append_history(run_dir, dict(record, end=time.time(), outcome="health_check_failed", message=msg))
                return rc if rc > 0 else EXIT_LAUNCH_ERROR
            if name == "per-node checks":
                problems = compare_nodes(read_preflight(preflight_folder(run_dir, alloc)), alloc.nodes)
                if problems:
                    msg = ("pre-flight: the nodes differ: " + "; ".join(problems) + ". Nothing was started: make every "
                           "node run the same Python, torch, DeepSpeed and project checkout (VENV / ENV_SETUP / REPO_DIR).")
                    print(f"error: {msg}", file=sys.stderr, flush=True)
                    append_history(run_dir, dict(record, end=time.time(), outcome="health_check_failed", message=msg))
                    return EXIT_LAUNCH_ERROR
            log(f"health check ok: {name} ({time.time() - t0:.1f}s)")

    if runner.preempt_signal is not None:
        outcome = Outcome("preempted", EXIT_PREEMPTED, f"{runner.preempt_signal} before training started")
    else:
        log(f"starting {alloc.world_size} rank(s): {shlex.join(train_cmd)}")
        hang_seconds = cfg.run.hang_timeout_minutes * 60
        rc = runner.run(train_cmd, env=env, watch=silence_watch(run_dir, alloc.job_id, alloc.restart,
                                                                 alloc.world_size, hang_seconds))
        verdict = read_verdict(run_dir, job=(alloc.job_id, alloc.restart))
        outcome = classify(rc, runner.ends, settings.launcher, verdict=verdict, killed=runner.killed_reason)
    record.update(end=time.time(), outcome=outcome.status, exit_code=outcome.exit_code, message=outcome.message,
                  signal=runner.preempt_signal,
                  failed=[{"task": e.task, "node": e.node, "what": e.what} for e in outcome.failed_tasks])

    if outcome.status == "finished":
        log(f"finished: outputs in {run_dir}")
        append_history(run_dir, record)
        return 0
    if outcome.status == "preempted":
        if runner.preempt_signal in ("SIGTERM", "SIGINT"):
            # TERM/INT reach the batch shell from `scancel`, the hard time limit or a node shutdown; Slurm
            # would accept a requeue even of a cancelled job, so requeueing here would make the job
            # impossible to cancel. (Slurm's own preemption with PreemptMode=REQUEUE requeues by itself.)
            log(f"checkpoint saved after {runner.preempt_signal} (scancel / time limit); not requeueing. "
                f"Resubmit the same command to resume from {run_dir}/checkpoints")
            append_history(run_dir, dict(record, requeued=False))
            return EXIT_PREEMPTED
        log(f"{outcome.message}; requeueing job {alloc.job_id} (attempt {alloc.restart + 1} will resume)")
        ok = requeue(alloc.job_id)
        append_history(run_dir, dict(record, requeued=ok))
        if not ok:
            print(f"error: requeue of job {alloc.job_id} refused (cancelled or out of time?); checkpoints in "
                  f"{run_dir}/checkpoints are intact: resubmit the same command to resume", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        return 0
    print(f"error: {outcome.message}. Lines of each rank are prefixed with its number (srun --label). "
          f"The last complete checkpoint in {run_dir}/checkpoints is untouched; resubmitting resumes from it.",
          file=sys.stderr, flush=True)
    if outcome.status == "hung" and cfg.run.requeue_on_hang:
        log(f"run.requeue_on_hang=true: requeueing job {alloc.job_id} (attempt {alloc.restart + 1} resumes; at most "
            f"MAX_RESTARTS={settings.max_restarts} attempts)")
        ok = requeue(alloc.job_id)
        append_history(run_dir, dict(record, requeued=ok))
        return 0 if ok else outcome.exit_code
    append_history(run_dir, record)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
