"""Learning-rate schedule: per-stage linear warmup, then constant or cosine decay.

A pure function of the optimizer-step count, so a resumed run needs only that count to continue
exactly. It restarts at each progressive stage (each stage has its own lr and warmup).
"""
from __future__ import annotations

import math

from trainer.config.stages import Stage, stage_at


def lr_at(step: int, stages: list[Stage], schedule: str, min_lr: float) -> float:
    stage = stage_at(stages, step)
    local = step - stage.start_step
    if stage.warmup_steps > 0 and local < stage.warmup_steps:
        return stage.lr * (local + 1) / stage.warmup_steps
    if schedule == "cosine":
        span = max(1, stage.steps - stage.warmup_steps)
        progress = min(1.0, (local - stage.warmup_steps) / span)
        return min_lr + 0.5 * (stage.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    return stage.lr


class StageLRScheduler:
    """Sets every param group's lr from ``lr_at``; DeepSpeed calls ``step()`` after each optimizer step."""

    def __init__(self, optimizer, stages: list[Stage], schedule: str = "constant", min_lr: float = 0.0):
        self.optimizer = optimizer
        self.stages = stages
        self.schedule = schedule
        self.min_lr = min_lr
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.last_step, self.stages, self.schedule, self.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr for _ in self.optimizer.param_groups]

    def step(self, *args, **kwargs) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
