"""Config loading, overrides, validation messages, DeepSpeed config filling, topology checks."""
import dataclasses
import json

import pytest

from trainer.config.schema import ConfigError, load_config
from trainer.config.ds_json import fill_ds_config, load_ds_config, resolve_ds_config_path
from trainer.engine.lr_schedule import lr_at
from trainer.config.stages import resolve_stages
from trainer.config.topology import LayoutError, Topology
from trainer.config.validate import validate_stage_batches, validate_values


def test_tiny_config_loads_with_overrides():
    cfg = load_config("configs/tiny.yaml", ["train.max_steps=3", "model.moe.num_experts=4", "log.wandb.tags=[a,b]"])
    assert cfg.train.max_steps == 3
    assert cfg.model.moe.num_experts == 4
    assert cfg.log.wandb.tags == ["a", "b"]
    assert cfg.model.hidden_size == 64 and cfg.model.depth <= 4


@pytest.mark.parametrize("override,needle", [
    ("train.max_step=3", "unknown config key 'train.max_step'"),
    ("trainer.lr=1", "unknown config key 'trainer'"),
    ("train.lr=fast", "'train.lr' expects a number"),
    ("train.max_steps=1.5", "'train.max_steps' expects an integer"),
    ("model.learn_sigma=maybe", "'model.learn_sigma' expects true/false"),
    ("train.lr", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as exc:
        load_config("configs/tiny.yaml", [override])
    assert needle in str(exc.value)


def test_stage_overrides_name_an_existing_stage_by_index():
    """What the long demo (README) and a Slurm OVERRIDES line rely on: one stage's keys changed, the others kept."""
    cfg = load_config("configs/demo.yaml", ["stages.0.steps=1800", "stages.1.steps=900", "stages.1.lr=2.5e-4"])
    base = load_config("configs/demo.yaml")
    assert [(s.resolution, s.steps, s.lr, s.global_batch) for s in cfg.stages] == [
        (64, 1800, None, None), (128, 900, 2.5e-4, base.stages[1].global_batch)]
    assert [s.steps for s in resolve_stages(cfg)] == [1800, 900]
    assert dataclasses.replace(cfg, stages=base.stages) == base  # nothing outside the stages moved


@pytest.mark.parametrize("config,override,needle", [
    ("configs/demo.yaml", "stages.2.steps=1", "'stages' has 2 entries (0..1), no entry 2"),
    ("configs/demo.yaml", "stages.last.steps=1", "'stages' is a list; name an entry by its index (0..1)"),
    ("configs/demo.yaml", "stages.0.stepz=1", "unknown config key 'stages[0].stepz'"),
    ("configs/demo.yaml", "stages.1=5", "config section 'stages[1]' must be a mapping"),
    ("configs/tiny.yaml", "stages.0.steps=5", "'stages' is not set in the config, so it has no entry 0"),
    ("configs/tiny.yaml", "train.lr.x=1", "'train.lr' is not a section"),
])
def test_bad_list_overrides_name_the_entry(config, override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(config, [override])
    assert needle in str(exc.value)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  max_steps: 5\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        load_config(str(p))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


@pytest.mark.parametrize("override,needle", [
    ("train.precision=fp8", "'train.precision' must be one of"),
    ("train.global_batch=0", "'train.global_batch' must be > 0"),
    ("train.ema_decay=1.5", "'train.ema_decay' must be in [0, 1]"),
    ("sample.method=euler", "sample.method=euler is a flow sampler"),
    ("model.qk_norm=l2", "'model.qk_norm' must be one of none, rmsnorm, layernorm"),
])
def test_value_validation(override, needle):
    cfg = load_config("configs/tiny.yaml", [override])
    with pytest.raises(ConfigError) as exc:
        validate_values(cfg)
    assert needle in str(exc.value)


def test_batch_divisibility_names_keys():
    cfg = load_config("configs/tiny.yaml", ["train.global_batch=12", "train.micro_batch=4"])
    with pytest.raises(ConfigError, match=r"train.global_batch=12 is not divisible by train.micro_batch × data-parallel size = 4 × 2 = 8"):
        validate_stage_batches(resolve_stages(cfg), Topology(2))


def test_ds_config_resolves_bare_names_and_fills_from_run_config():
    assert resolve_ds_config_path("zero2.json").endswith("configs/zero2.json")
    cfg = load_config("configs/tiny.yaml", ["train.precision=bf16", "train.grad_clip=0.5"])
    ds = fill_ds_config(load_ds_config("zero2"), cfg, global_batch=16, micro_batch=4, data_parallel=2, on_cuda=False)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    with pytest.raises(ConfigError, match="not found"):
        resolve_ds_config_path("zero9.json")


def test_ds_config_conflicts_are_errors():
    cfg = load_config("configs/tiny.yaml")
    with pytest.raises(ConfigError, match="'train_batch_size'=32 but the run config gives 8"):
        fill_ds_config({"train_batch_size": 32}, cfg, global_batch=8, micro_batch=4, data_parallel=2, on_cuda=False)
    with pytest.raises(ConfigError, match="'optimizer' section"):
        fill_ds_config({"optimizer": {"type": "Adam"}}, cfg, global_batch=8, micro_batch=4, data_parallel=2, on_cuda=False)
    with pytest.raises(ConfigError, match="enables 'fp16'"):
        fill_ds_config({"fp16": {"enabled": True}}, cfg, global_batch=8, micro_batch=4, data_parallel=2, on_cuda=True)


def test_fp16_is_autocast_over_fp32_weights_on_every_device():
    """DeepSpeed's 'fp16' section casts the weights to half (the DiT's fp32 latents and timestep embedding then
    meet half weights in F.linear); fp16 is torch autocast like bf16, the loss scale is the trainer's."""
    cfg16 = load_config("configs/tiny.yaml", ["train.precision=fp16"])
    for on_cuda in (False, True):
        ds = fill_ds_config({}, cfg16, global_batch=8, micro_batch=4, data_parallel=2, on_cuda=on_cuda)
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "float16"} and "fp16" not in ds


def test_every_shipped_ds_config_is_valid_json():
    for name in ("zero1", "zero2", "zero3", "zero3_offload", "zero2_offload"):
        with open(resolve_ds_config_path(name)) as f:
            assert "zero_optimization" in json.load(f)


@pytest.mark.parametrize("topo,kwargs,needle", [
    (Topology(3, tensor=2), {}, "world size 3 is not divisible by parallel.tensor × parallel.pipeline"),
    (Topology(4, pipeline=2), {"zero_stage": 2}, "ZeRO stage 2 cannot be combined with parallel.pipeline=2"),
    (Topology(4, tensor=4), {"num_heads": 6}, "num_heads=6 is not divisible by parallel.tensor=4"),
    (Topology(4, pipeline=4), {"depth": 2}, "parallel.pipeline=4 stages exceed the model depth 2"),
    (Topology(4, expert=2), {"num_experts": 3}, "num_experts=3 is not divisible by parallel.expert=2"),
    (Topology(2, expert=2), {"num_experts": 0}, "needs an MoE model"),
])
def test_invalid_layouts_are_rejected(topo, kwargs, needle):
    with pytest.raises(LayoutError) as exc:
        topo.validate(**kwargs)
    assert needle in str(exc.value)


def test_topology_data_parallel_size():
    assert Topology(8, tensor=2, pipeline=2).validate(num_heads=4, hidden_size=64, depth=4).data == 2


def test_progressive_stages_inherit_and_lr_restarts(tmp_path):
    p = tmp_path / "prog.yaml"
    p.write_text("train: {lr: 0.1, warmup_steps: 2, global_batch: 8, micro_batch: 4}\n"
                 "stages:\n  - {resolution: 64, steps: 4}\n  - {resolution: 128, steps: 3, lr: 0.05, micro_batch: 2}\n")
    stages = resolve_stages(load_config(str(p)))
    assert [(s.resolution, s.start_step, s.end_step, s.micro_batch, s.lr) for s in stages] == [
        (64, 0, 4, 4, 0.1), (128, 4, 7, 2, 0.05)]
    lrs = [lr_at(k, stages, "constant", 0.0) for k in range(7)]
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.025, 0.05, 0.05])
    cos = [lr_at(k, stages, "cosine", 0.0) for k in range(4)]
    assert cos[2] == pytest.approx(0.1) and cos[3] == pytest.approx(0.05)


def test_readme_config_reference_is_current_and_complete():
    from trainer.config.reference import HELP, iter_keys, reference_markdown

    keys = [k for k, _, _ in iter_keys()]
    assert set(keys) == set(HELP), f"undocumented: {set(keys) - set(HELP)}; stale: {set(HELP) - set(keys)}"
    from tests.runs import REPO

    with open(f"{REPO}/README.md") as f:
        readme = f.read()
    assert reference_markdown() in readme, "README's config table is stale: run python -m trainer.config.reference"
