"""Fault-injection hooks for tests: the only ones in the trainer, both read from the environment.

``DIT_FAULT_NAN_STEPS=5,6`` makes the loss of optimizer steps 5 and 6 (1-based, the step being computed)
NaN on global rank 0, first micro-batch; ``DIT_FAULT_PAUSE_AFTER_CHECKPOINT=8`` makes every rank sleep
(60 s, or ``8:SECONDS``) right after the step-8 checkpoint is published, so a test can SIGKILL a run at a
known point instead of racing a fast one.
"""
from __future__ import annotations

import os
import time

FAULT_NAN_ENV = "DIT_FAULT_NAN_STEPS"
FAULT_PAUSE_ENV = "DIT_FAULT_PAUSE_AFTER_CHECKPOINT"


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
