"""DeepSpeed JSON: found by bare name under configs/, then filled from the run config.

The run config is the one source of truth for batch sizes, precision, optimizer and scheduler.
A DeepSpeed JSON that sets one of those keys to a different value is an error, not a silent
override, because two places disagreeing about the batch size is how runs silently diverge.
"""
from __future__ import annotations

import copy
import json
import os

from trainer.config.schema import ConfigError, RunConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")


def resolve_ds_config_path(name: str) -> str:
    """``zero2.json`` → ``<repo>/configs/zero2.json`` unless the name is an existing path."""
    if os.path.isfile(name):
        return name
    for candidate in (os.path.join(CONFIGS_DIR, name), os.path.join(CONFIGS_DIR, name + ".json")):
        if os.path.isfile(candidate):
            return candidate
    known = sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".json")) if os.path.isdir(CONFIGS_DIR) else []
    raise ConfigError(f"DeepSpeed config '{name}' not found (looked in . and {CONFIGS_DIR}; available: {', '.join(known)})")


def load_ds_config(name: str) -> dict:
    path = resolve_ds_config_path(name)
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _claim(ds: dict, key: str, value, source: str) -> None:
    """Set ``ds[key]`` unless the JSON already holds a different value."""
    if key in ds and ds[key] != "auto" and ds[key] != value:
        raise ConfigError(
            f"DeepSpeed config sets '{key}'={ds[key]!r} but the run config gives {value!r} ({source}); "
            f"remove '{key}' from the JSON, the run config is the source of truth"
        )
    ds[key] = value


def fill_ds_config(ds: dict, cfg: RunConfig, *, global_batch: int, micro_batch: int, data_parallel: int,
                   on_cuda: bool) -> dict:
    """Return a copy of ``ds`` with batch, precision, clipping and optimizer filled from ``cfg``."""
    ds = copy.deepcopy(ds)
    if global_batch % (micro_batch * data_parallel):
        raise ConfigError(
            f"train.global_batch={global_batch} is not divisible by train.micro_batch × data-parallel size = "
            f"{micro_batch} × {data_parallel} = {micro_batch * data_parallel}"
        )
    _claim(ds, "train_batch_size", global_batch, "train.global_batch")
    _claim(ds, "train_micro_batch_size_per_gpu", micro_batch, "train.micro_batch")
    _claim(ds, "gradient_accumulation_steps", global_batch // (micro_batch * data_parallel),
           "train.global_batch / (train.micro_batch × data-parallel size)")
    _claim(ds, "gradient_clipping", float(cfg.train.grad_clip), "train.grad_clip")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"DeepSpeed config has an '{section}' section; set train.lr/beta1/beta2/weight_decay/warmup_steps/"
                f"lr_schedule in the run config instead (the trainer builds the optimizer and schedule)"
            )
    for section in ("fp16", "bf16", "torch_autocast"):
        if ds.get(section, {}).get("enabled"):
            raise ConfigError(f"DeepSpeed config enables '{section}'; set train.precision in the run config instead")
    precision = cfg.train.precision
    if precision in ("bf16", "fp16"):
        # fp32 weights, master and loss; bf16/fp16 matmuls: DeepSpeed's torch-autocast mode. (DeepSpeed's own
        # "fp16" section would cast the weights to half while the latents and timestep embedding stay fp32,
        # and the first F.linear fails on the dtype mismatch.) fp16 adds dynamic loss scaling, which the
        # trainer installs on the ZeRO optimizer (trainer/engine/loss_scale.py).
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    if not on_cuda:
        apply_cpu_choices(ds)
    ds.setdefault("steps_per_print", 10 ** 9)  # the trainer does its own logging
    ds.setdefault("wall_clock_breakdown", False)
    # ... and its own throughput: DeepSpeed's throughput timer synchronises the device at the start and end of
    # every micro-step (two full GPU drains per micro-step, measured by tests/test_host_syncs.py)
    ds.setdefault("timers", {"throughput": {"enabled": False, "synchronized": False}})
    return ds


# ZeRO settings that are right on GPUs (the shipped JSONs) but not on CPU ranks, with the CPU value and why.
CPU_CHOICES = {
    "overlap_comm": (False, "no second stream on CPU: overlap only doubles the reduce buckets"),
    "pin_memory": (False, "page-locked host memory exists for GPU DMA; on CPU it only locks RAM"),
}


def apply_cpu_choices(ds: dict) -> list[str]:
    """Turn the GPU-only ZeRO settings of a shipped JSON into their CPU values (in place); returns what changed.

    The shipped JSONs (configs/zero*.json) and the planner (cluster/plan.py) hold the GPU settings; a run on CPU
    ranks gets these instead, at fill time, so one JSON serves both."""
    changed = []
    z = ds.get("zero_optimization") or {}
    if z.get("overlap_comm"):
        z["overlap_comm"] = CPU_CHOICES["overlap_comm"][0]
        changed.append("zero_optimization.overlap_comm")
    for section in ("offload_optimizer", "offload_param"):
        if (z.get(section) or {}).get("pin_memory"):
            z[section]["pin_memory"] = CPU_CHOICES["pin_memory"][0]
            changed.append(f"zero_optimization.{section}.pin_memory")
    return changed


def save_ds_config(ds: dict, path: str) -> None:
    from trainer.rundir import atomic_write_text

    atomic_write_text(path, json.dumps(ds, indent=2))
