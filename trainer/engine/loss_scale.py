"""Dynamic loss scaling for ``train.precision=fp16`` (torch autocast over fp32 weights) under ZeRO.

fp16 matmuls flush small gradients to zero; the loss is multiplied by a scale S before backward so they
stay representable, and the gradients are divided by S before the optimizer uses them. S is halved when a
step overflows (that step is skipped) and doubled after ``window`` clean steps.

DeepSpeed 0.19's ``torch_autocast`` with ``float16`` puts a ``torch.amp.GradScaler`` inside its ZeRO
optimizers, but ZeRO's own step never learns its scale (measured on CPU ranks, tests/test_fp16.py):

* the gradient norm is taken on the S-scaled gradients and divided by ZeRO's static scale of 1, so the
  reported norm is S times too large and ``gradient_clipping`` clips the scaled gradients to the threshold,
  after which the GradScaler divides by S again: every clipped update is S (65536) times too small;
* an overflow (infinite norm) takes ZeRO's skip path, which returns before the GradScaler's ``update``, so
  S never shrinks and a run that overflows once keeps overflowing.

So the trainer removes that GradScaler and gives ZeRO the scale through its public ``override_loss_scale``:
ZeRO then scales the loss by S, divides the norm by S (correct ``grad_norm`` and clipping), unscales the
gradients by S, and skips the step on a non-finite norm, as its own fp16 mode does. After each optimizer
step this module reads ZeRO's ``overflow`` flag (a Python bool ZeRO already computed: no extra sync) and
updates S by DeepSpeed's fp16 rule and defaults (``DynamicLossScale``). The scale is saved in the
optimizer's checkpoint state, so a resumed run continues with the same S.

Without ZeRO (stage 0), DeepSpeed's engine-level GradScaler unscales before clipping and is correct: it
is kept and only read for metrics.
"""
from __future__ import annotations

from typing import Optional

import torch

STATE_KEY = "dit_dynamic_loss_scale"


class DynamicLossScale:
    """DeepSpeed's ``DynamicLossScaler`` rule with its fp16 defaults (initial 2**16, window 1000, hysteresis 2,
    minimum 1): an overflow costs one unit of hysteresis and, when none is left, halves the scale; ``window``
    steps after the last overflow the scale doubles and the hysteresis refills."""

    def __init__(self, init_scale: float = 2.0 ** 16, window: int = 1000, hysteresis: int = 2,
                 min_scale: float = 1.0, factor: float = 2.0):
        self.scale, self.window, self.hysteresis = float(init_scale), int(window), int(hysteresis)
        self.min_scale, self.factor = float(min_scale), float(factor)
        self.hysteresis_left = self.hysteresis
        self.iteration = 0
        self.last_overflow = -1
        self.overflows = 0  # skipped steps in total (resumes with the checkpoint)

    def update(self, overflow: bool) -> None:
        if overflow:
            self.overflows += 1
            if self.hysteresis_left <= 1:
                self.scale = max(self.scale / self.factor, self.min_scale)
            else:
                self.hysteresis_left -= 1
            self.last_overflow = self.iteration
        elif (self.iteration - self.last_overflow) % self.window == 0:
            self.hysteresis_left = self.hysteresis
            self.scale *= self.factor
        self.iteration += 1

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.__dict__:
                setattr(self, key, value)


class ZeroLossScaling:
    """``DynamicLossScale`` wired into a DeepSpeed ZeRO optimizer (stages 1-3); see the module docstring."""

    def __init__(self, optimizer, scale: Optional[DynamicLossScale] = None):
        self.optimizer = optimizer
        self.scale = scale or DynamicLossScale()
        optimizer.torch_autocast_gradscaler = None  # its scale is invisible to ZeRO's norm, clipping and skips
        optimizer.custom_loss_scaler = True
        optimizer.external_loss_scale = self.scale.scale
        self._wrap()

    def _wrap(self) -> None:
        opt = self.optimizer
        step, state_dict, load_state_dict = opt.step, opt.state_dict, opt.load_state_dict

        def scaled_step(*args, **kwargs):
            result = step(*args, **kwargs)
            self.scale.update(bool(opt.overflow))
            opt.external_loss_scale = self.scale.scale  # the next step's loss scale
            return result

        def saved_state(*args, **kwargs):
            sd = state_dict(*args, **kwargs)
            sd[STATE_KEY] = self.scale.state_dict()
            return sd

        def restored_state(state_dict_list, *args, **kwargs):
            out = load_state_dict(state_dict_list, *args, **kwargs)
            first = state_dict_list[0] if isinstance(state_dict_list, (list, tuple)) else state_dict_list
            if isinstance(first, dict) and STATE_KEY in first:
                self.scale.load_state_dict(first[STATE_KEY])
                opt.external_loss_scale = self.scale.scale
            return out

        opt.step, opt.state_dict, opt.load_state_dict = scaled_step, saved_state, restored_state

    def stats(self) -> dict:
        """Host numbers only (no device read): current scale and skipped (overflow) steps so far."""
        return {"loss_scale": self.scale.scale, "overflow_steps": self.scale.overflows}


class GradScalerStats:
    """Metrics view of DeepSpeed's engine-level GradScaler (no ZeRO): reads the scale on log steps only."""

    def __init__(self, engine):
        self.engine = engine

    def stats(self) -> dict:
        scaler = self.engine.torch_autocast_z0_gradscaler
        return {"loss_scale": float(scaler.get_scale()), "overflow_steps": int(self.engine.skipped_steps)}


def install_fp16_loss_scaling(engine):
    """After ``deepspeed.initialize``: the loss scaling of an fp16-autocast engine (None for bf16 / fp32)."""
    if not engine.torch_autocast_enabled() or engine.torch_autocast_dtype() != torch.float16:
        return None
    opt = engine.optimizer
    if hasattr(opt, "override_loss_scale") and hasattr(opt, "torch_autocast_gradscaler"):
        return ZeroLossScaling(opt)
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        return GradScalerStats(engine)
    raise RuntimeError(f"train.precision=fp16: the DeepSpeed optimizer {type(opt).__name__} has no loss scaling "
                       "the trainer knows how to drive; use bf16, or ZeRO stage 1-3")
