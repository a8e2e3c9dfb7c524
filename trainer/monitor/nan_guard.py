"""Skipping a non-finite step under DeepSpeed, identically on every rank, leaving no trace in the training state.

1. each micro-step folds "its loss is NaN/Inf" into a flag on the device (no host wait); at the optimizer boundary,
   before ``engine.step``, the ranks agree on it with one all-reduce (MAX) and one read, so every rank decides the
   same thing for the same step and the trainer waits for the device once per step, not per micro-step;
2. every micro-step still calls ``engine.backward`` and ``engine.step`` (DeepSpeed's micro-step and
   gradient-accumulation counters, ZeRO's bucket bookkeeping and hooks stay consistent). A non-finite loss whose
   graph is finite (an injected ``loss + nan``) gives finite gradients; a real overflow inside the network gives
   NaN gradients in DeepSpeed's buckets. Neither reaches the weights (3.);
3. at the step's boundary the *inner* torch optimizer's ``step`` is replaced by a no-op for that one
   call, so neither the weights nor the Adam moments nor its step count change whatever the gradients hold. With
   NaN/Inf gradients ZeRO-1/2/3 also take their own overflow path (the global gradient norm is invalid): no
   update, gradients and buckets cleared, LR scheduler not stepped, ``engine.was_step_applied()`` False. Either way
   the gradients are zeroed after the boundary, so nothing is carried into the next step's accumulation
   (tests/test_divergence_zero.py checks weights, moments and EMA bit-for-bit against a run that skipped the
   batches by hand, on ZeRO-1/2/3 and the pipeline engine);
4. whether a step was applied is decided from ``engine.was_step_applied()`` and the loop's own flag together
   (``step_applied``), so a step DeepSpeed skipped by itself (NaN gradients with a finite loss, an fp16
   loss-scale overflow) is handled like one the loop skipped: no EMA update, counted in
   ``TrainerState.nan_skipped``, and the LR schedule position stays the number of applied steps (``realign_lr``
   undoes the scheduler step DeepSpeed takes on the loop's no-op path). A skipped step is then exactly a batch
   that was never there;
5. the trainer's step counter, sample count and data position advance as for a normal step, so resume stays
   exact.
"""
from __future__ import annotations

import contextlib


class NanGuard:
    """Agreement across ranks on non-finite losses, and the consecutive / total counts."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0

    def any_nonfinite(self, value) -> bool:
        """Collective: True on every rank when ``value`` is NaN/Inf on any rank."""
        import torch

        return self.agree(~torch.isfinite(value.detach()).all())

    def agree(self, flag) -> bool:
        """Collective: True on every rank when the device bool ``flag`` is True on any rank. One all-reduce on the
        device and one read: the trainer's only host wait of a step outside log steps."""
        import torch.distributed as dist

        t = flag.detach().reshape(1).float()  # already on the device: no copy
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

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


def step_applied(engine) -> bool:
    """DeepSpeed's word on the last optimizer boundary: False when it took its own overflow path (NaN/Inf gradients,
    an fp16 loss-scale overflow) and so changed no weights and did not step the LR scheduler."""
    fn = getattr(engine, "was_step_applied", None)
    return True if fn is None else bool(fn())


def realign_lr(scheduler, position: int) -> None:
    """Put the LR schedule at ``position`` (the number of applied optimizer steps, see the module docstring)."""
    if scheduler is not None and hasattr(scheduler, "last_step") and scheduler.last_step != position:
        scheduler.load_state_dict({"last_step": position})


def local_nonfinite(loss_sums, params) -> tuple[bool, bool]:
    """This rank's view for the pipeline engine, which runs forward, backward and step inside one ``train_batch``:
    (the last stage's loss sums are NaN/Inf, a gradient this rank holds is NaN/Inf); no collective."""
    import torch

    loss_bad = loss_sums is not None and not bool(torch.isfinite(loss_sums).all())
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else []  # one reduction per tensor: inf/NaN anywhere shows
    return loss_bad, bool(norms) and not bool(torch.isfinite(torch.stack(norms)).all())
