"""Automatic rollback: PaLM's recipe for a diverging run, done by the loop instead of by hand at 3 a.m.

When the run diverges (``train.max_nan_steps`` non-finite steps in a row, agreed by every rank in
trainer/monitor/nan_guard.py, or a loss spike sustained for ``train.blowup_steps`` steps,
trainer/monitor/divergence.py), every rank together:

1. finds the newest verified checkpoint written *before* the divergence began (the onset: the first step of the
   non-finite streak, or of the spike), hashed in parallel like a resume (``checkpoint.find_verified``);
2. sets aside the checkpoints written since the onset (``checkpoints/diverged/``: resume never looks there, and
   ``latest`` moves back), so a crash now cannot resume diverged weights;
3. restores that checkpoint (weights, optimizer, LR schedule, EMA, RNG: ``trainer/loop/restore.py``, the resume path);
4. skips the data the failed attempt consumed since that checkpoint: the step counter goes back to the checkpoint's
   step c, but the data position continues where the failure left it (p_f), so the window [p_c, p_f) is never
   trained on again. Per-sample noise, timesteps and label drops are keyed by sample position, so the steps after
   the rollback are exactly those of a run resumed from checkpoint c with ``data_position = p_f``
   (tests/test_rollback.py checks the losses bit for bit);
5. records the window in ``TrainerState.data_skips`` (so every later checkpoint carries it) and, before training
   continues, in ``run.dir/rollbacks.jsonl``: a later resume from a checkpoint that predates the rollback (a crash
   before the next checkpoint, a corrupt newer one) skips the same window when it reaches it; and reports it in
   ``events.jsonl`` (``rollback``), W&B and ``trainer.status``; ``metrics.jsonl`` is cut back to step c, as on
   resume, so no step is logged twice.

At most ``train.max_rollbacks`` times over the run (the count is kept in the checkpoints and in rollbacks.jsonl,
so requeues do not reset it). Past that, or with no checkpoint from before the onset, the run stops with exit 6
(``EXIT_DIVERGED``) after setting aside the checkpoints written since the onset: the newest checkpoint left is
the last good one, intact. ``train.max_rollbacks=0`` keeps the old behaviour: a non-finite streak stops with a
checkpoint of the (unchanged) weights and exit 3, and a sustained spike only alerts.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch.distributed as dist

from trainer import rundir
from trainer.engine.distributed import all_reduce_max_flags, barrier
from trainer.loop.ownership import rewind_metrics
from trainer.loop.restore import restore_checkpoint
from trainer.monitor.nan_guard import realign_lr
from trainer.rundir import EXIT_DIVERGED, EXIT_NAN_STOP
from trainer.state import checkpoint as ckpt

RESTORED = "restored"  # after_step's answer when the loop must re-enter the stage of the restored state
NONFINITE, BLOWUP = "non-finite steps", "loss blow-up"


def consumed_windows(restored, failed, stages, dp_size: int) -> list[dict]:
    """The data the failed attempt consumed after checkpoint ``restored``, per stage: [{stage, start, end,
    start_batch, end_batch}] in sample positions (elastic stream) and per-rank micro-batches (resampled stream).
    Every step consumed its global batch whether it was applied or not."""
    windows = []
    for s in range(restored.stage, failed.stage + 1):
        st = stages[s]
        gas = st.global_batch // (st.micro_batch * dp_size)
        if s == restored.stage:
            start, start_b, first_step = restored.data_position, restored.data_batches, restored.step
        else:
            start, start_b, first_step = 0, 0, st.start_step
        if s == failed.stage:
            end, end_b = failed.data_position, failed.data_batches
        else:
            steps = max(0, min(failed.step, st.end_step) - first_step)
            end, end_b = start + steps * st.global_batch, start_b + steps * gas
        if end > start:
            windows.append({"stage": s, "start": start, "end": end, "start_batch": start_b, "end_batch": end_b})
    return windows


def window_at(state, skips: list[dict]) -> Optional[dict]:
    """The recorded skip window that holds the state's next sample, if any."""
    for w in skips:
        if w["stage"] == state.stage and w["start"] <= state.data_position < w["end"]:
            return w
    return None


def merge_windows(*lists) -> list[dict]:
    out, seen = [], set()
    for w in (w for lst in lists for w in lst):
        key = (w["stage"], w["start"], w["end"])
        if key not in seen:
            seen.add(key)
            out.append(dict(w))
    return out


class Recovery:
    """The loop's divergence policy (see the module docstring). Built after resume; every method is called on
    every rank at the same point."""

    def __init__(self, trainer):
        self.tr = trainer
        self._merge_recorded()

    # ------------------------------------------------------------------ data windows
    def _merge_recorded(self) -> None:
        """Windows of rollbacks that the resumed checkpoint predates (read on rank 0, the same for every rank)."""
        records = rundir.read_jsonl(rundir.rollbacks_path(self.tr.run_dir)) if self.tr.rank == 0 else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [records]
            dist.broadcast_object_list(box, src=0)
            records = box[0]
        state = self.tr.state
        state.data_skips = merge_windows(state.data_skips, [w for r in records for w in r.get("windows", [])])
        state.rollbacks = max(state.rollbacks, len(records))

    def enter_stage(self, stage) -> None:
        """Before the stage's stream is built: the LR schedule at least at the stage's start (skipped steps of an
        earlier stage left it behind: it counts applied steps), and the position past any recorded skip window."""
        sched = getattr(self.tr, "scheduler", None)
        if getattr(sched, "last_step", stage.start_step) < stage.start_step:
            realign_lr(sched, stage.start_step)
        state = self.tr.state
        while (w := window_at(state, state.data_skips)) is not None:
            if self.tr.rank == 0:
                print(f"[rollback] skipping samples [{state.data_position}, {w['end']}) of stage {w['stage']} "
                      f"(recorded by rollback {w.get('rollback', '?')})", flush=True)
            state.data_position, state.data_batches = w["end"], w["end_batch"]

    def skip_due(self) -> bool:
        """True when the next step's data lies in a recorded window (a resume from before a rollback reached it):
        the loop then re-enters the stage, which jumps the stream past it."""
        return window_at(self.tr.state, self.tr.state.data_skips) is not None

    # ------------------------------------------------------------------ after each step
    def after_step(self):
        """None to go on; RESTORED after a rollback; an exit code to stop. Collective only on log steps (one
        flag) and when acting, so it adds no host sync to other steps."""
        tr = self.tr
        streak = tr.monitor.should_stop  # already agreed across ranks, step by step
        logged, verdict = tr.monitor.take_verdict()  # every rank logs the same steps: the collective below matches
        blowup = False
        if logged:
            blowup = all_reduce_max_flags([verdict is not None and verdict.sustained], tr.device)[0]
        if streak:
            onset = tr.state.step - tr.monitor.nan.in_row + 1
            detail = f"{tr.monitor.nan.in_row} non-finite steps in a row (train.max_nan_steps)"
            return self._act(NONFINITE, onset, detail)
        if blowup:
            mine = (verdict.onset_step, verdict.statistic, verdict.threshold) if verdict is not None and \
                verdict.sustained else (tr.state.step, float("nan"), float("nan"))
            onset, stat, thr = self._agreed(mine)
            detail = (f"loss {stat:.1f}x its timestep-matched baseline (threshold {thr:.1f}x) for "
                      f"{tr.cfg.train.blowup_steps} steps (train.blowup_steps)")
            return self._act(BLOWUP, int(onset), detail)
        return None

    def _agreed(self, value):
        """Rank 0's value on every rank (the detector's inputs are all-reduced, but a decision is taken once)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return value

    def _act(self, reason: str, onset: int, detail: str):
        tr, cfg = self.tr, self.tr.cfg
        if cfg.train.max_rollbacks <= 0:
            return self._nan_stop() if reason == NONFINITE else None  # rollback off: the old stop, or alerts only
        if tr.state.rollbacks >= cfg.train.max_rollbacks:
            return self._stop(onset, f"{reason} at step {tr.state.step} ({detail}) after {tr.state.rollbacks} "
                                     f"rollback(s) (train.max_rollbacks={cfg.train.max_rollbacks})")
        target, _ = ckpt.find_verified(tr.ckpt_dir, before_step=onset)
        if target is None:
            if reason == NONFINITE:  # skipped steps changed nothing: the weights now are those before the streak
                return self._nan_stop()
            return self._stop(onset, f"{reason} at step {tr.state.step} ({detail}) and no checkpoint from before "
                                     f"step {onset} to roll back to")
        return self._roll_back(target, reason, onset, detail)

    def _roll_back(self, target: str, reason: str, onset: int, detail: str) -> str:
        tr = self.tr
        failed = tr.state
        moved = ckpt.set_aside_checkpoints(tr.ckpt_dir, onset, tr.cfg.checkpoint.keep_last) if tr.rank == 0 else []
        barrier()
        restored = restore_checkpoint(tr, target)
        n = failed.rollbacks + 1
        windows = [dict(w, rollback=n) for w in consumed_windows(restored, failed, tr.stages, tr.topo.data)]
        restored.rollbacks = n
        restored.data_skips = merge_windows(restored.data_skips, failed.data_skips, windows)
        restored.model_config = tr.arch.to_dict()
        tr.state = restored
        tr.monitor.after_rollback()
        tr.last_log_time, tr.steps_since_log, tr.samples_since_log, tr.data_time = time.time(), 0, 0, 0.0
        skipped = sum(w["end"] - w["start"] for w in windows)
        record = {"event": "rollback", "rollback": n, "max_rollbacks": tr.cfg.train.max_rollbacks, "reason": reason,
                  "detail": detail, "from_step": failed.step, "onset_step": onset, "to_step": restored.step,
                  "checkpoint": os.path.basename(target), "set_aside": moved, "windows": windows,
                  "skipped_samples": skipped, "time": time.time()}
        if tr.rank == 0:
            with open(rundir.rollbacks_path(tr.run_dir), "a") as f:  # before training goes on: a resume repeats it
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            rewind_metrics(tr.run_dir, restored.step)
        if tr._is_logging_rank():
            span = ", ".join(f"[{w['start']}, {w['end']}) of stage {w['stage']}" for w in windows) or "none"
            tr.metrics.event(record)
            tr.metrics.alert("rolled back", f"{reason} at step {failed.step} ({detail}); restored "
                             f"{os.path.basename(target)} and skipped samples {span} ({skipped} samples); rollback "
                             f"{n} of {tr.cfg.train.max_rollbacks}", "WARN")
        barrier()
        return RESTORED

    # ------------------------------------------------------------------ stopping
    def _nan_stop(self) -> int:
        tr = self.tr
        tr.save()  # skipped steps changed no weights: this is the last good state
        tr.monitor.nan_stop()
        tr.monitor.close("failed")
        tr.metrics.close()
        return EXIT_NAN_STOP

    def _stop(self, onset: int, why: str) -> int:
        tr = self.tr
        moved = ckpt.set_aside_checkpoints(tr.ckpt_dir, onset, tr.cfg.checkpoint.keep_last) if tr.rank == 0 else []
        barrier()
        if tr._is_logging_rank():
            left = ckpt.list_checkpoints(tr.ckpt_dir)
            msg = (f"{why}; stopped without writing. Last good checkpoint: "
                   f"{os.path.basename(left[0][1]) if left else 'none'}"
                   + (f" (set aside, written after the divergence began: {', '.join(moved)})" if moved else ""))
            tr.metrics.alert("stopped: diverged", msg, "ERROR")
            tr.metrics.event({"event": "error", "step": tr.state.step, "kind": "diverged", "message": msg,
                              "onset_step": onset, "set_aside": moved})
        tr.monitor.close("failed")
        tr.metrics.close()
        return EXIT_DIVERGED
