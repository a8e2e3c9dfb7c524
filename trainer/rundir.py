"""The run-directory contract: every file a run writes in ``run.dir``, how to read them, and what exit codes mean.

Torch-free and dependency-free on purpose: ``trainer.status`` on a login node, ``trainer.report``, the W&B sink,
``trainer.evaluate`` and the Slurm launcher (``cluster/launch.py``) all read run directories through this module,
so a file name or an exit code is defined once. docs/architecture.md ("The run directory") describes it for
ML-ops tools written outside this repository.

Writers use ``atomic_write_text`` for small files (a reader sees the old file or the new one, never a torn one)
and append whole lines to the JSON-lines files (``read_jsonl`` tolerates a torn last line of a killed run).
"""
from __future__ import annotations

import json
import os
from typing import Optional

# --------------------------------------------------------------------------- file names (relative to run.dir)
CONFIG = "config.yaml"              # the fully resolved run config
DS_CONFIG = "ds_config.json"        # the filled DeepSpeed config
METRICS = "metrics.jsonl"           # one record per logged step
EVENTS = "events.jsonl"             # lifecycle events, alerts, sample images
EVALS = "evals.jsonl"               # evaluation results (trainer.evaluate, in-training evaluation)
HEARTBEAT = "heartbeat.json"        # the logging rank's liveness record, rewritten every log.heartbeat_seconds
LEASE = "lease.json"                # who writes this run directory (trainer/state/lease.py); absent when none
WANDB_RUN_ID = "wandb_run_id"       # one W&B run per training run, across resumes
WANDB_STATE = "wandb_state.json"    # what the W&B sink already sent (evaluations), across resumes
SLURM_JOB_ID = "slurm_job_id"       # written by the Slurm scripts
CHECKPOINTS = "checkpoints"         # checkpoints/stepNNNNNNNN/ + checkpoints/latest
LATEST = "latest"                   # inside checkpoints/: the newest published tag, written last
SAMPLES = "samples"                 # EMA sample grids
LAUNCH = "launch"                   # per-attempt launch records of the Slurm launcher
LAUNCH_HISTORY = "history.jsonl"    # inside launch/: one record per attempt
ROLLBACKS = "rollbacks.jsonl"       # one record per automatic rollback (and the data window it skipped)
DIVERGED = "diverged"               # inside checkpoints/: checkpoints written after a divergence began, set aside
CHECKPOINT_COMPLETE = "COMPLETE.json"  # inside each checkpoint: file list (sizes, checksums), written last
RANKS = "ranks"                     # ranks/rank-NNNNN.json: every rank's liveness and progress (trainer/monitor/liveness.py)
FAILURE = "failure.json"            # the first failure or hang of the current attempt, ranks in order (written once)


def path(run_dir: str, *names: str) -> str:
    return os.path.join(run_dir, *names)


def metrics_path(run_dir: str) -> str:
    return path(run_dir, METRICS)


def events_path(run_dir: str) -> str:
    return path(run_dir, EVENTS)


def evals_path(run_dir: str) -> str:
    return path(run_dir, EVALS)


def heartbeat_path(run_dir: str) -> str:
    return path(run_dir, HEARTBEAT)


def checkpoints_dir(run_dir: str) -> str:
    return path(run_dir, CHECKPOINTS)


def launch_dir(run_dir: str) -> str:
    return path(run_dir, LAUNCH)


def rollbacks_path(run_dir: str) -> str:
    return path(run_dir, ROLLBACKS)


def ranks_dir(run_dir: str) -> str:
    return path(run_dir, RANKS)


def rank_path(run_dir: str, rank: int) -> str:
    return path(run_dir, RANKS, f"rank-{int(rank):05d}.json")


def failure_path(run_dir: str) -> str:
    return path(run_dir, FAILURE)


# --------------------------------------------------------------------------- exit codes
# One meaning per number, shared by the trainer (trainer/main.py, the loop) and the launcher (cluster/launch.py).
EXIT_OK = 0
EXIT_FAILED = 1             # an unhandled error in a rank (traceback in the log, 'error' event in events.jsonl)
EXIT_CONFIG_ERROR = 2       # bad config, DeepSpeed JSON, shard set or layout: nothing started
EXIT_NAN_STOP = 3           # train.max_nan_steps non-finite steps in a row, no rollback (off, or no checkpoint before)
EXIT_LAUNCH_ERROR = 4       # the launcher could not start the ranks (allocation, health check, launcher missing)
EXIT_RUN_DIR_BUSY = 5       # another live run holds run.dir (refused at start, or this run's lease was taken over)
EXIT_DIVERGED = 6           # diverged again after train.max_rollbacks rollbacks (or none possible): last good checkpoint kept
EXIT_HUNG = 7               # a rank made no progress for run.hang_timeout_minutes: the job was torn down, stuck rank named
EXIT_PREEMPTED = 75         # checkpointed on USR1/TERM for a requeue (EX_TEMPFAIL)

EXIT_CODES = {
    EXIT_OK: "finished",
    EXIT_FAILED: "a rank failed (see the log and events.jsonl)",
    EXIT_CONFIG_ERROR: "configuration error (nothing was started)",
    EXIT_NAN_STOP: "stopped after non-finite steps (last good checkpoint kept)",
    EXIT_LAUNCH_ERROR: "launch error (ranks not started)",
    EXIT_RUN_DIR_BUSY: "run directory held by another run",
    EXIT_DIVERGED: "diverged; rollbacks used up or impossible (last good checkpoint kept)",
    EXIT_HUNG: "hung: a rank made no progress for run.hang_timeout_minutes; torn down (stuck rank named)",
    EXIT_PREEMPTED: "preempted: checkpointed for requeue",
}


def describe_exit(code: int) -> str:
    return EXIT_CODES.get(code, f"exit code {code}")


# --------------------------------------------------------------------------- reading and writing
def atomic_write_text(target: str, text: str, *, fsync: bool = True) -> None:
    """Write a temporary file beside ``target``, fsync, rename over it: readers never see a torn file."""
    tmp = f"{target}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(file: str) -> Optional[dict]:
    """A small JSON file, or None when it is missing or unreadable (being replaced, torn by a dead writer)."""
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_jsonl(file: str, max_bytes: int = 0) -> list[dict]:
    """Records of a JSON-lines file, tolerating a torn last line (a run killed mid-write).

    ``max_bytes`` > 0 reads only the file's tail (metrics files of long runs grow large).
    """
    if not os.path.exists(file):
        return []
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes and size > max_bytes:
            f.seek(size - max_bytes)
            f.readline()  # drop the partial first line
        lines = f.read().decode("utf-8", "replace").splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_metrics(run_dir: str) -> list[dict]:
    return read_jsonl(metrics_path(run_dir))


VAL_PREFIX = "val/"  # metrics.jsonl: a validation record (trainer/loop/validation.py) holds val/loss, val/ema_loss, ...


def is_val_record(record: dict) -> bool:
    """A validation record of metrics.jsonl (step, stage, resolution, val/*), not a training-step record."""
    return "val/loss" in record


def truncate_after_step(file: str, step: int) -> int:
    """Cut a step-ordered JSON-lines file (metrics.jsonl) after the last record with ``step`` <= ``step``.

    Records are appended in step order, so everything past the first record beyond ``step`` is later too; the
    file is truncated in place at that byte offset (a torn last line goes as well). Returns the records dropped.
    """
    if not os.path.exists(file):
        return 0
    offset, cut, dropped = 0, None, 0
    with open(file, "rb") as f:
        for line in f:
            try:
                record_step = json.loads(line).get("step")
            except ValueError:
                record_step = None  # a torn line: only ever the last one
            if cut is None and (record_step is None and not line.endswith(b"\n") or
                                isinstance(record_step, (int, float)) and record_step > step):
                cut = offset
            if cut is not None:
                dropped += 1
            offset += len(line)
    if cut is not None:
        os.truncate(file, cut)
    return dropped


def latest_tag(run_dir: str) -> Optional[str]:
    """The tag the ``checkpoints/latest`` pointer names (None when there is none)."""
    try:
        with open(path(run_dir, CHECKPOINTS, LATEST)) as f:
            return f.read().strip() or None
    except OSError:
        return None
