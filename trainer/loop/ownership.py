"""The loop's side of "one writer per run directory": take the lease before anything is written, on rank 0, and
tell every rank the outcome (trainer/state/lease.py has the protocol).

Also trims ``metrics.jsonl`` back to the step a run resumes from: steps logged after the last checkpoint by a
run that then died are trained again, and must not appear twice.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch.distributed as dist

from trainer.monitor.liveness import clear as clear_liveness
from trainer.rundir import metrics_path, truncate_after_step
from trainer.state.lease import Lease, RunDirBusy, describe


def take_run_dir(run_dir: str, timeout_seconds: float, takeover: bool,
                 rank: int) -> tuple[Optional[Lease], Optional[dict], str]:
    """Collective. Rank 0 gets (lease, takeover record or None, attempt); other ranks (None, the same record, the
    same attempt). ``attempt`` is the lease's token: it marks this attempt's liveness records (ranks/), and the
    records and failure verdict of earlier attempts are removed before any rank of this one writes its own.

    Raises RunDirBusy on every rank when a live run holds ``run_dir``."""
    outcome, lease = None, None
    if rank == 0:
        lease = Lease(run_dir, timeout_seconds)
        try:
            outcome = {"ok": True, "taken": lease.acquire(force=takeover), "attempt": lease.token}
            clear_liveness(run_dir)
        except RunDirBusy as exc:
            outcome = {"ok": False, "message": str(exc)}
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if not outcome["ok"]:
        raise RunDirBusy(outcome["message"])
    taken = outcome["taken"]
    if taken and rank == 0:
        print(f"[trainer] took over {run_dir} from {describe(taken['previous'], lease.clock())}: {taken['reason']}",
              file=sys.stderr, flush=True)
    return lease, taken, outcome["attempt"]


def rewind_metrics(run_dir: str, step: int) -> int:
    """Drop metrics records past ``step`` (the step training continues from); returns how many were dropped."""
    dropped = truncate_after_step(metrics_path(run_dir), step)
    if dropped:
        print(f"[trainer] metrics.jsonl: {dropped} record(s) after step {step} dropped (trained again from the "
              "checkpoint; no step is logged twice)", flush=True)
    return dropped


def report_run_dir_events(metrics, skipped_checkpoints: list, taken: Optional[dict], step: int) -> None:
    """events.jsonl (+ alerts) for what set-up found: corrupt checkpoints passed over, a lease taken over."""
    for skipped in skipped_checkpoints:
        metrics.event({"event": "checkpoint_rejected", "checkpoint": skipped["checkpoint"],
                       "problem": skipped["problem"]})
        metrics.alert("corrupt checkpoint skipped", skipped["problem"], "WARN")
    if taken:
        previous = taken["previous"]
        metrics.event({"event": "lease_takeover", "step": step, "reason": taken["reason"],
                       "previous": {k: previous.get(k) for k in ("host", "pid", "slurm_job_id", "slurm_restart",
                                                                 "started")}})
