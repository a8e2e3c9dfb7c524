"""Alerts: non-finite loss (skip the step, stop after N in a row), loss spikes, stalls (watchdog + heartbeat).

Every alert becomes a line in the log (``[alert] title: text``), an ``alert`` record in
``events.jsonl`` (which ``trainer.status`` shows as a flag) and, when W&B runs online, a
``wandb.alert``. All of it goes through ``trainer.metrics.Metrics.alert``.

Skipping a non-finite step under DeepSpeed (``NanGuard`` + ``optimizer_update_skipped``):

1. each micro-step computes its loss before backward; ranks agree with one all-reduce (MAX of a
   "non-finite" flag), so every rank decides the same thing for the same step;
2. a flagged micro-step still calls ``engine.backward`` and ``engine.step`` (DeepSpeed's micro-step and
   gradient-accumulation counters, ZeRO's bucket bookkeeping and hooks stay consistent), but on
   ``loss * 0`` so nothing is accumulated;
3. at the step's boundary the *inner* torch optimizer's ``step`` is replaced by a no-op for that one
   call: DeepSpeed still reduces/partitions/zeroes gradients, but neither the weights nor the Adam
   moments nor its step count change (verified bit-for-bit by tests/test_monitor_wandb.py). Should
   ZeRO itself see NaN gradients and take its overflow path, that skips the update too; the LR
   scheduler is then realigned with the step counter by the caller;
4. the trainer's step counter, sample count and data position advance as for a normal step, so
   resume stays exact; the count is kept in ``TrainerState.nan_skipped``.

Test hooks (the only fault injection in the trainer, both read from the environment):
``DIT_FAULT_NAN_STEPS=5,6`` makes the loss of optimizer steps 5 and 6 (1-based, the step being computed)
NaN on global rank 0, first micro-batch; ``DIT_FAULT_PAUSE_AFTER_CHECKPOINT=8`` makes every rank sleep
(60 s, or ``8:SECONDS``) right after the step-8 checkpoint is published, so a test can SIGKILL a run at a
known point instead of racing a fast one.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import threading
import time
from collections import deque
from typing import Callable, Optional

from trainer.atomic import atomic_write_text

FAULT_NAN_ENV = "DIT_FAULT_NAN_STEPS"
FAULT_PAUSE_ENV = "DIT_FAULT_PAUSE_AFTER_CHECKPOINT"
EXIT_NAN_STOP = 3  # the run stopped after train.max_nan_steps non-finite steps in a row
HEARTBEAT_FILE = "heartbeat.json"


def fault_nan_steps(environ=None) -> frozenset:
    """Steps whose loss the test hook makes NaN (empty unless DIT_FAULT_NAN_STEPS is set)."""
    raw = (environ if environ is not None else os.environ).get(FAULT_NAN_ENV, "")
    return frozenset(int(s) for s in raw.replace(" ", "").split(",") if s)


def fault_pause_after_checkpoint(step: int, environ=None) -> None:
    """The pause test hook (see the module docstring); does nothing unless its variable names ``step``."""
    raw = (environ if environ is not None else os.environ).get(FAULT_PAUSE_ENV, "")
    if not raw:
        return
    target, _, seconds = raw.partition(":")
    if int(target) == step:
        time.sleep(float(seconds or 60))


class NanGuard:
    """Agreement across ranks on non-finite losses, and the consecutive / total counts."""

    def __init__(self, max_in_row: int, device):
        self.max_in_row = max_in_row
        self.device = device
        self.in_row = 0

    def any_nonfinite(self, value) -> bool:
        """Collective: True on every rank when ``value`` is NaN/Inf on any rank."""
        import torch
        import torch.distributed as dist

        bad = 0.0 if bool(torch.isfinite(value.detach()).all()) else 1.0
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([bad], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            bad = float(t.item())
        return bad > 0

    def update(self, skipped: bool) -> None:
        self.in_row = self.in_row + 1 if skipped else 0

    @property
    def should_stop(self) -> bool:
        return self.max_in_row > 0 and self.in_row >= self.max_in_row


def basic_optimizer(engine):
    """The torch optimizer that DeepSpeed's wrappers (ZeRO, bf16, fp16) finally call."""
    opt = getattr(engine, "basic_optimizer", None)
    if opt is not None:
        return opt
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and opt.optimizer is not opt:
        opt = opt.optimizer
    return opt


@contextlib.contextmanager
def optimizer_update_skipped(engine, active: bool = True):
    """Inside the block, the inner optimizer's ``step`` does nothing (see the module docstring)."""
    if not active:
        yield
        return
    opt = basic_optimizer(engine)
    opt.step = lambda *args, **kwargs: None  # instance attribute shadows the class's step
    try:
        yield
    finally:
        del opt.step


class LossSpikeDetector:
    """A logged loss above ``factor`` x the median of the last ``window`` finite losses is a spike."""

    def __init__(self, factor: float, window: int = 50, min_history: int = 10):
        self.factor = factor
        self.history: deque = deque(maxlen=window)
        self.min_history = min_history

    def check(self, loss: float) -> Optional[float]:
        """The running median when ``loss`` is a spike, else None; finite losses join the history."""
        if loss != loss or loss in (float("inf"), float("-inf")):
            return None
        spike = None
        if self.factor > 0 and len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if median > 0 and loss > self.factor * median:
                spike = median
        self.history.append(loss)
        return spike


def write_heartbeat(run_dir: str, record: dict) -> None:
    path = os.path.join(run_dir, HEARTBEAT_FILE)
    try:
        atomic_write_text(path, json.dumps(record), fsync=False)
    except OSError:
        pass  # a full disk must not stop training; status then reports the heartbeat as old


class Watchdog:
    """Heartbeat writer and stall detector of the logging rank.

    The loop calls ``beat(step)`` after every optimizer step. A daemon thread calls ``check`` every
    ``interval`` seconds: it rewrites ``run.dir/heartbeat.json`` (so a dead process is told apart from
    a slow one by the heartbeat's age) and raises one ``stall`` alert when no step came for
    ``stall_seconds``, and an INFO alert when steps resume. ``check(now)`` takes the time as an
    argument so tests drive it without sleeping.
    """

    def __init__(self, run_dir: str, stall_seconds: float, interval: float, alert: Callable[[str, str, str], None],
                 clock: Callable[[], float] = time.time):
        self.run_dir = run_dir
        self.stall_seconds = stall_seconds
        self.interval = max(0.05, interval)
        self.alert = alert
        self.clock = clock
        self.step = 0
        self.last_step_time = clock()
        self.started = self.last_step_time
        self.stalled = False
        self.state = "running"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self, step: int) -> None:
        with self._lock:
            self.step = step
            self.last_step_time = self.clock()
            was_stalled, self.stalled = self.stalled, False
        if was_stalled:
            self.alert("stall cleared", f"step {step} completed; training resumed", "INFO")

    def check(self, now: Optional[float] = None) -> bool:
        """Write the heartbeat; alert once per stall. True while stalled."""
        now = self.clock() if now is None else now
        with self._lock:
            idle = now - self.last_step_time
            newly = self.state == "running" and 0 < self.stall_seconds < idle and not self.stalled
            if newly:
                self.stalled = True
            record = {"time": now, "step": self.step, "last_step_time": self.last_step_time,
                      "stalled": self.stalled, "state": self.state, "pid": os.getpid(),
                      "host": socket.gethostname(), "stall_seconds": self.stall_seconds}
        write_heartbeat(self.run_dir, record)
        if newly:
            self.alert("stall", f"no optimizer step for {idle / 60:.1f} min (last completed step {self.step}; "
                                f"threshold {self.stall_seconds / 60:.1f} min)", "ERROR")
        return self.stalled

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watchdog must never take the run down
                pass

    def start(self) -> "Watchdog":
        self.check()
        self._thread = threading.Thread(target=self._run, name="dit-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, state: str = "stopped") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.state = state
        self.check()
