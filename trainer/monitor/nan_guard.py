"""Skipping a non-finite step under DeepSpeed, identically on every rank.

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
"""
from __future__ import annotations

import contextlib


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
