"""Run configuration: YAML + dotted ``key=value`` overrides → one validated, typed tree.

Why a schema of dataclasses rather than a free dict: every key a run may set is declared once,
with its type and default, so a typo (``train.max_step``) or a wrong type (``train.lr=fast``) is
rejected up front with the key named, before any worker allocates memory or opens a shard.
The resolved tree is what gets written to ``run.dir/config.yaml`` and checked on resume.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A problem with the run configuration; the message names the key or file."""


# --------------------------------------------------------------------------- schema


@dataclass
class RunSection:
    dir: str = "runs/default"
    seed: int = 0
    name: str = ""
    lease_timeout_minutes: float = 5.0  # a lease holder silent this long is presumed dead and taken over
    hang_timeout_minutes: float = 30.0  # a rank without progress this long: job torn down, stuck rank named (0 = off)
    requeue_on_hang: bool = False  # requeue the Slurm job after a hang (off: a deterministic hang would loop)


@dataclass
class MoESection:
    num_experts: int = 0  # 0 = dense feed-forward everywhere
    top_k: int = 2
    every: int = 1  # MoE FFN in every k-th block
    capacity_factor: float = 1.25
    shared_expert: bool = False
    noisy_gate: bool = False
    aux_loss_coef: float = 0.01


@dataclass
class ModelSection:
    name: str = "DiT-S/2"
    # Architecture overrides on top of the named preset (None = preset value).
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    mlp_ratio: Optional[float] = None
    class_dropout_prob: float = 0.1
    num_classes: int = 0  # 0 = take it from the shard manifest
    learn_sigma: bool = True
    qk_norm: str = "none"  # none | rmsnorm | layernorm
    ffn: str = "gelu"  # gelu (official MLP) | swiglu
    output_conv: int = 0  # 3x3 conv layers over the DiT's output across token borders (0 off = reference, 1, 2)
    norm: str = "layernorm"
    grad_checkpoint: int = 0  # 0 off, 1 every block, k every k-th block
    moe: MoESection = field(default_factory=MoESection)


@dataclass
class ObjectiveSection:
    kind: str = "diffusion"  # diffusion | flow
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    flow_timesteps: str = "logit_normal"  # uniform | logit_normal
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0


@dataclass
class DataSection:
    root: str = ""
    resolution: int = 64
    num_workers: int = 0
    shuffle_buffer: int = 1000  # resampled stream only
    shuffle_block: int = 262144  # elastic stream: samples per shuffle block (0 = shuffle whole epochs)
    resampled: bool = False  # False: the elastic, layout-independent epoch stream; True: the order-free resampled one
    val_root: str = ""  # validation shard sets (one per resolution); "" = the set the training manifest records


@dataclass
class TrainSection:
    max_steps: int = 100
    global_batch: int = 8
    micro_batch: int = 8
    precision: str = "fp32"  # fp32 | bf16 | fp16
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    compile: bool = False  # torch.compile each DiT block (trainer/engine/compile.py); ZeRO 0-2, no TP/PP/MoE
    fused_adamw: bool = True  # torch's one-pass AdamW kernel (CPU and CUDA); false: the multi-tensor one
    tf32: bool = True  # fp32 matmuls/convolutions on TF32 tensor cores (CUDA, Ampere+), as the reference DiT
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_every: int = 1
    allow_batch_change: bool = False  # resume with another global batch, continuing at the same sample position
    max_nan_steps: int = 5  # this many non-finite steps in a row: roll back (max_rollbacks > 0) or stop
    max_rollbacks: int = 3  # automatic rollbacks to the last good checkpoint; past them the run stops (exit 6)
    blowup_steps: int = 20  # a loss spike lasting this many steps (in logged records) is a blow-up: roll back (0 = alert only)


@dataclass
class WandbSection:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "dit"
    entity: str = ""
    group: str = ""
    tags: list = field(default_factory=list)


@dataclass
class LogSection:
    every: int = 10
    sample_every: int = 0  # 0 = only at the end of training
    wandb: WandbSection = field(default_factory=WandbSection)
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = GPU table by device name, or a measured matmul on CPU
    stall_minutes: float = 30.0  # no optimizer step for this long -> stall alert (0 = no alert; heartbeat still written)
    heartbeat_seconds: float = 30.0  # how often the logging rank rewrites run.dir/heartbeat.json
    spike_factor: float = 3.0  # timestep-matched loss above factor x its baseline -> spike (0 = off): monitor/divergence.py
    spike_budget: float = 1e-4  # false alarms per logged record the spike threshold is set to allow
    val_every: int = 0  # steps between validation-loss evaluations (0 = off): trainer/loop/validation.py
    val_samples: int = 256  # held-out latents evaluated (the first N of the validation shard set)
    val_timesteps: int = 8  # K fixed equidistant timesteps
    val_alert_evals: int = 3  # alert when the EMA validation loss rises this many evaluations in a row (0 = off)
    eval_every: int = 0  # steps between in-training FID evaluations of the EMA (0 = off): trainer/loop/evaluation.py
    eval_per_class: int = 10  # EMA samples per class (sample.classes, else every class), sampled as sample.*
    eval_batch: int = 32  # samples per sampling batch on each rank
    eval_extractor: str = ""  # local TorchScript feature network; "fid" only for Inception-v3 pool3, else fd_<name>
    eval_extractor_name: str = ""  # the network's name in records (default: its file name)
    eval_ref: str = ""  # ADM reference batch .npz (mu/sigma or arr_0); "" = held-out latents decoded by the VAE
    eval_ref_samples: int = 0  # held-out latents in that reference (0 = as many as are sampled)


@dataclass
class CheckpointSection:
    every: int = 1000
    keep_last: int = 3
    init_from: str = ""  # a checkpoint dir to initialise weights from (no optimizer state)


@dataclass
class SampleSection:
    cfg_scale: float = 4.0
    steps: int = 50
    method: str = "ddim"  # ddim | ddpm (diffusion), euler | heun (flow)
    classes: list = field(default_factory=list)  # empty = every class
    per_class: int = 4
    seed: int = 0


@dataclass
class ParallelSection:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    pipeline_partition: str = "parameters"  # parameters | uniform | comma-separated layer counts


@dataclass
class StageSection:
    """One progressive-resolution stage; None fields inherit from the top-level sections."""

    resolution: int = 0
    steps: int = 0
    global_batch: Optional[int] = None
    micro_batch: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    data_root: Optional[str] = None
    sample_every: Optional[int] = None
    checkpoint_every: Optional[int] = None


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    sample: SampleSection = field(default_factory=SampleSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    stages: list = field(default_factory=list)  # list[StageSection]
    pe_interpolation: bool = False


CHOICES = {
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.lr_schedule": ("constant", "cosine"),
    "objective.kind": ("diffusion", "flow"),
    "objective.noise_schedule": ("linear", "cosine", "squaredcos_cap_v2"),
    "objective.flow_timesteps": ("uniform", "logit_normal"),
    "model.ffn": ("gelu", "swiglu"),
    "model.qk_norm": ("none", "rmsnorm", "layernorm"),
    "model.norm": ("layernorm", "rmsnorm"),
    "log.wandb.mode": ("online", "offline", "disabled"),
    "sample.method": ("ddim", "ddpm", "euler", "heun"),
}

# --------------------------------------------------------------------------- building from dicts


def _is_optional(tp) -> tuple[bool, Any]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return True, args[0]
    return False, tp


def _coerce_number(value: Any, cast: type, what: str, key: str):
    """int or float from a YAML/CLI value; bools and lossy conversions (1.5 → int) are rejected."""
    if not isinstance(value, bool):
        if isinstance(value, (int, float)) and (cast is float or float(value).is_integer()):
            return cast(value)
        if isinstance(value, str):
            try:
                return cast(value)
            except ValueError:
                pass
    raise ConfigError(f"config key '{key}' expects {what}, got {value!r}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the declared type, or raise naming the key."""
    optional, base = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' must not be null")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if base is int:
        return _coerce_number(value, int, "an integer", key)
    if base is float:
        return _coerce_number(value, float, "a number", key)
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    if base is list or typing.get_origin(base) is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return list(value)
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known in this section: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = prefix + f.name
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value if value is not None else {}, key + ".")
        elif f.name == "stages" and cls is RunConfig:
            if not isinstance(value, list):
                raise ConfigError(f"config key 'stages' must be a list of mappings, got {value!r}")
            kwargs[f.name] = [_build(StageSection, s, f"stages[{i}].") for i, s in enumerate(value)]
        else:
            kwargs[f.name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _list_index(dotted: str, path: str, items: list, part: str) -> int:
    """The entry ``part`` names in the list at ``path`` (``stages.1.steps``: entry 1 of ``stages``); only existing
    entries can be overridden, so a typo cannot append a stage."""
    if not part.isdigit():
        raise ConfigError(f"override '{dotted}': '{path}' is a list; name an entry by its index "
                          f"(0..{len(items) - 1}), e.g. {path}.0")
    if int(part) >= len(items):
        raise ConfigError(f"override '{dotted}': '{path}' has {len(items)} entries (0..{len(items) - 1}), "
                          f"no entry {part}")
    return int(part)


def _set_dotted(tree: dict, dotted: str, raw_value: str) -> None:
    """Set ``a.b.c=value`` in the raw YAML tree; a number after a list names its entry (``stages.1.steps=900``:
    the second stage's steps), so a stage can be changed from the command line or a Slurm OVERRIDES line."""
    parts = dotted.split(".")
    node: dict | list = tree
    for depth, part in enumerate(parts[:-1]):
        path = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            nxt = node[_list_index(dotted, ".".join(parts[:depth]), node, part)]
        else:
            nxt = node.get(part)
            if nxt is None and parts[depth + 1].isdigit():
                raise ConfigError(f"override '{dotted}': '{path}' is not set in the config, so it has no entry "
                                  f"{parts[depth + 1]}")
            if nxt is None:
                nxt = node[part] = {}
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"override '{dotted}': '{path}' is not a section")
        node = nxt
    # YAML parsing gives ints/floats/bools/lists their natural types; _coerce checks them.
    try:
        value = yaml.safe_load(raw_value) if raw_value != "" else ""
    except yaml.YAMLError:
        value = raw_value
    if isinstance(node, list):
        node[_list_index(dotted, ".".join(parts[:-1]), node, parts[-1])] = value
    else:
        node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def load_config(path: Optional[str], overrides: list[str] = ()) -> RunConfig:
    """Read YAML (optional), apply dotted overrides, return the typed tree (not yet validated)."""
    tree: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    tree = copy.deepcopy(tree)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return _build(RunConfig, tree, "")


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str) -> None:
    from trainer.rundir import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def get_dotted(cfg: RunConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
