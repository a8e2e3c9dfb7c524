"""Whole-run validation, done once before any heavy work (no model, no process group yet).

Every failure is a ConfigError/LayoutError whose one-line message names the key or file, so a bad
Slurm submission fails in seconds with the reason in its output file instead of hanging.
"""
from __future__ import annotations

from trainer.config.schema import CHOICES, ConfigError, RunConfig, get_dotted
from trainer.config.shards import ShardSet, open_shard_set
from trainer.config.ds_json import zero_stage
from trainer.config.stages import Stage, resolve_stages
from trainer.config.topology import Topology

POSITIVE = ("train.max_steps", "train.global_batch", "train.micro_batch", "log.every", "checkpoint.every",
            "checkpoint.keep_last", "sample.per_class", "sample.steps", "train.ema_every", "run.lease_timeout_minutes",
            "log.heartbeat_seconds", "log.val_samples", "log.val_timesteps", "log.eval_per_class",
            "log.eval_batch")
NON_NEGATIVE = ("train.lr", "train.min_lr", "train.warmup_steps", "train.weight_decay", "train.grad_clip",
                "log.sample_every", "data.num_workers", "model.grad_checkpoint", "model.num_classes", "log.stall_minutes",
                "train.max_nan_steps", "train.max_rollbacks", "train.blowup_steps", "log.spike_factor",
                "run.hang_timeout_minutes", "log.val_every", "log.val_alert_evals", "log.eval_every",
                "log.eval_ref_samples")


def validate_values(cfg: RunConfig) -> None:
    for key, allowed in CHOICES.items():
        value = get_dotted(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}")
    for key in POSITIVE:
        if get_dotted(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get_dotted(cfg, key)}")
    for key in NON_NEGATIVE:
        if get_dotted(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {get_dotted(cfg, key)}")
    if not 0.0 <= cfg.train.ema_decay <= 1.0:
        raise ConfigError(f"config key 'train.ema_decay' must be in [0, 1], got {cfg.train.ema_decay}")
    if not 0.0 < cfg.log.spike_budget < 0.5:
        raise ConfigError(f"config key 'log.spike_budget' must be in (0, 0.5), got {cfg.log.spike_budget}")
    if 0 < cfg.log.spike_factor <= 1.0:
        raise ConfigError(f"config key 'log.spike_factor' must be 0 (off) or > 1, got {cfg.log.spike_factor}")
    if not 0.0 <= cfg.model.class_dropout_prob < 1.0:
        raise ConfigError(f"config key 'model.class_dropout_prob' must be in [0, 1), got {cfg.model.class_dropout_prob}")
    moe = cfg.model.moe
    if moe.num_experts < 0:
        raise ConfigError(f"config key 'model.moe.num_experts' must be >= 0, got {moe.num_experts}")
    if moe.num_experts > 0 and not 1 <= moe.top_k <= moe.num_experts:
        raise ConfigError(f"config key 'model.moe.top_k' must be in [1, model.moe.num_experts={moe.num_experts}], got {moe.top_k}")
    if cfg.run.lease_timeout_minutes * 60 < 2 * cfg.log.heartbeat_seconds:
        raise ConfigError(f"config key 'run.lease_timeout_minutes'={cfg.run.lease_timeout_minutes} must be at least two "
                          f"heartbeats (log.heartbeat_seconds={cfg.log.heartbeat_seconds}), or a live run would look dead")
    if 0 < cfg.run.hang_timeout_minutes * 60 < 5:
        raise ConfigError(f"config key 'run.hang_timeout_minutes'={cfg.run.hang_timeout_minutes} is under 5 seconds; "
                          f"a rank's liveness record is written every second at best (0 turns the hang watchdog off)")
    if not cfg.run.dir:
        raise ConfigError("config key 'run.dir' is not set")
    if cfg.sample.method in ("ddim", "ddpm") and cfg.sample.steps < 2:
        raise ConfigError(f"config key 'sample.steps'={cfg.sample.steps}: the respaced diffusion samplers need at least "
                          f"2 steps (a 1-step schedule has no posterior variance)")
    if cfg.objective.kind == "flow" and cfg.sample.method in ("ddim", "ddpm"):
        raise ConfigError(f"sample.method={cfg.sample.method} is a diffusion sampler; objective.kind=flow uses euler or heun")
    if cfg.objective.kind == "diffusion" and cfg.sample.method in ("euler", "heun"):
        raise ConfigError(f"sample.method={cfg.sample.method} is a flow sampler; objective.kind=diffusion uses ddim or ddpm")


def compile_conflicts(*, zero_stage: int, tensor: int, pipeline: int, num_experts: int) -> list[str]:
    """Why ``train.compile=true`` cannot run with this layout (empty: it can)."""
    reasons = []
    if zero_stage >= 3:
        reasons.append("ZeRO-3 (parameters are gathered in module hooks)")
    if tensor > 1:
        reasons.append(f"parallel.tensor={tensor} (fairscale's collective layers)")
    if pipeline > 1:
        reasons.append(f"parallel.pipeline={pipeline} (DeepSpeed's pipeline engine)")
    if num_experts > 0:
        reasons.append(f"model.moe.num_experts={num_experts} (DeepSpeed-MoE's data-dependent routing)")
    return reasons


def validate_stage_batches(stages: list[Stage], topo: Topology) -> None:
    for s in stages:
        where = f"stages[{s.index}]" if len(stages) > 1 else "train"
        if s.micro_batch <= 0 or s.global_batch <= 0:
            raise ConfigError(f"{where}: global_batch and micro_batch must be > 0")
        if s.global_batch % (s.micro_batch * topo.data):
            raise ConfigError(
                f"{where}.global_batch={s.global_batch} is not divisible by {where}.micro_batch × data-parallel size = "
                f"{s.micro_batch} × {topo.data} = {s.micro_batch * topo.data} (world {topo.world}, tensor "
                f"{topo.tensor}, pipeline {topo.pipeline})")


def validate_run(cfg: RunConfig, ds: dict, world_size: int) -> tuple[list[Stage], list[ShardSet], Topology]:
    """All checks; returns the resolved stages, their shard sets and the topology."""
    validate_values(cfg)
    stages = resolve_stages(cfg)
    if cfg.stages:
        cfg.train.max_steps = sum(s.steps for s in stages)  # derived: the resolved config shows the total
    topo = Topology(world_size, cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.expert)
    shard_sets = [open_shard_set(s.data_root, s.resolution) for s in stages]
    from trainer.config.model import architecture, latent_size

    first = shard_sets[0]
    channels, h, _ = first.latent_shape
    downsample = stages[0].resolution // h if h else 8
    for s, shards in zip(stages, shard_sets):
        c = shards.latent_shape[0]
        if c != channels:
            raise ConfigError(f"shard set {shards.directory} has {c} latent channels, stage 0 has {channels}")
        expect = latent_size(s.resolution, downsample)
        if tuple(shards.latent_shape[1:]) != (expect, expect):
            raise ConfigError(f"shard set {shards.directory} holds latents {shards.latent_shape}, expected "
                              f"{channels}×{expect}×{expect} for {s.resolution} px")
    arch = architecture(cfg, in_channels=channels, input_size=h, num_classes=first.num_classes)
    topo.validate(zero_stage=zero_stage(ds), num_heads=arch.num_heads, hidden_size=arch.hidden_size,
                  depth=arch.depth, num_experts=cfg.model.moe.num_experts)
    if cfg.train.compile:
        reasons = compile_conflicts(zero_stage=zero_stage(ds), tensor=topo.tensor, pipeline=topo.pipeline,
                                    num_experts=cfg.model.moe.num_experts)
        if reasons:
            raise ConfigError("train.compile=true does not work with " + "; ".join(reasons)
                              + ": set train.compile=false or change the layout")
    validate_stage_batches(stages, topo)
    if cfg.log.val_every:
        validate_validation(cfg, stages, shard_sets, topo)
    if cfg.log.eval_every:
        validate_evaluation(cfg, stages, shard_sets)
    return stages, shard_sets, topo


def validate_validation(cfg: RunConfig, stages: list[Stage], shard_sets: list[ShardSet], topo: Topology) -> None:
    """log.val_every > 0: a held-out shard set per stage, disjoint from its training set; a supported layout."""
    from trainer.config.shards import check_held_out, val_shard_set

    if topo.pipeline > 1:
        raise ConfigError(f"log.val_every={cfg.log.val_every} is not supported with parallel.pipeline={topo.pipeline}: "
                          "the validation loss runs the model outside DeepSpeed's pipeline schedule; set log.val_every=0 "
                          "or use ZeRO / tensor / expert parallelism")
    for s, shards in zip(stages, shard_sets):
        check_held_out(val_shard_set(cfg, s, shards), shards)


def validate_evaluation(cfg: RunConfig, stages: list[Stage], shard_sets: list[ShardSet]) -> None:
    """log.eval_every > 0: a local feature network, and a reference (a file, or a held-out shard set per stage)."""
    import os

    from trainer.config.shards import check_held_out, val_shard_set

    log = cfg.log
    if not log.eval_extractor:
        raise ConfigError(f"log.eval_every={log.eval_every} needs log.eval_extractor: a local TorchScript feature "
                          "network (e.g. NVIDIA's inception-2015-12-05.pt; nothing is downloaded)")
    if not os.path.isfile(log.eval_extractor):
        raise ConfigError(f"log.eval_extractor: no such file {log.eval_extractor}")
    if log.eval_ref:
        if not os.path.isfile(log.eval_ref):
            raise ConfigError(f"log.eval_ref: no such file {log.eval_ref}")
        return
    for s, shards in zip(stages, shard_sets):  # the reference: held-out latents of each stage
        classes = len(cfg.sample.classes) or cfg.model.num_classes or int(shards.manifest.get("num_classes", 0))
        needed = log.eval_ref_samples or classes * log.eval_per_class
        purpose = (f"the FID reference (log.eval_every={log.eval_every}, log.eval_ref unset: log.eval_ref_samples="
                   f"{log.eval_ref_samples}, else log.eval_per_class x classes)")
        check_held_out(val_shard_set(cfg, s, shards, needed, purpose), shards)
