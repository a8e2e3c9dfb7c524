"""Progressive-resolution stages resolved into concrete, fully specified steps of a run.

A config without ``stages:`` is one stage built from the top-level sections, so the training loop
has a single code path. Unspecified stage values inherit from the top-level sections.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainer.config.schema import RunConfig, ConfigError


@dataclass(frozen=True)
class Stage:
    index: int
    resolution: int
    steps: int
    start_step: int  # global step at which this stage begins
    global_batch: int
    micro_batch: int
    lr: float
    warmup_steps: int
    data_root: str
    sample_every: int
    checkpoint_every: int

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps


def resolve_stages(cfg: RunConfig) -> list[Stage]:
    t = cfg.train
    if not cfg.stages:
        return [
            Stage(0, cfg.data.resolution, t.max_steps, 0, t.global_batch, t.micro_batch, t.lr, t.warmup_steps,
                  cfg.data.root, cfg.log.sample_every, cfg.checkpoint.every)
        ]
    stages, start = [], 0
    for i, s in enumerate(cfg.stages):
        if s.resolution <= 0:
            raise ConfigError(f"config key 'stages[{i}].resolution' must be set (64, 128, 256 or 512)")
        if s.steps <= 0:
            raise ConfigError(f"config key 'stages[{i}].steps' must be > 0")
        pick = lambda v, d: d if v is None else v  # noqa: E731
        stages.append(Stage(
            index=i,
            resolution=s.resolution,
            steps=s.steps,
            start_step=start,
            global_batch=pick(s.global_batch, t.global_batch),
            micro_batch=pick(s.micro_batch, t.micro_batch),
            lr=pick(s.lr, t.lr),
            warmup_steps=pick(s.warmup_steps, t.warmup_steps),
            data_root=pick(s.data_root, cfg.data.root),
            sample_every=pick(s.sample_every, cfg.log.sample_every),
            checkpoint_every=pick(s.checkpoint_every, cfg.checkpoint.every),
        ))
        start += s.steps
    return stages


def total_steps(cfg: RunConfig) -> int:
    return sum(s.steps for s in resolve_stages(cfg))


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that trains global step ``step`` (0-based: the step about to run)."""
    for s in stages:
        if step < s.end_step:
            return s
    return stages[-1]
