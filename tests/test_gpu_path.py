"""The GPU path's decisions, checked on CPU: GPU choice per rank (issue 20 item 4), TF32 and the MFU peak (6), the
shipped ZeRO JSONs vs the planner and the CPU fill (8).

Nothing here fakes a GPU result: the mapping and precision rules are pure functions of the counts and
capabilities torch would report, and the only mocked calls are ``torch.cuda`` queries (device name, capability).
"""
import copy
import os

import pytest
import torch

from trainer.config.ds_json import CPU_CHOICES, apply_cpu_choices, fill_ds_config, load_ds_config
from trainer.config.schema import load_config
from trainer.engine.device import (DeviceMappingError, configure_matmul_precision, math_mode, plan_cuda_device,
                                   shared_gpu_problem, tf32_in_effect)
from trainer.monitor import telemetry

SHIPPED = ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]


# --------------------------------------------------------------------------- item 4: one GPU per rank


@pytest.mark.parametrize("visible", [8, 16])
def test_all_gpus_visible_uses_local_rank_like_deepspeed(visible):
    for local in range(8):
        placement = plan_cuda_device(local, 8, visible)
        assert placement.index == local and placement.env == {}  # DeepSpeed's cuda:LOCAL_RANK, unchanged


def test_one_visible_gpu_per_task_maps_every_rank_to_it_and_tells_deepspeed(monkeypatch):
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_RANK", raising=False)
    for local in range(8):
        placement = plan_cuda_device(local, 8, 1)
        assert placement.index == 0
        env = dict(os.environ, **placement.env)
        # DeepSpeed reads the device index from LOCAL_RANK (engine, init_process_group device_id, PipelineModule)
        assert int(env["LOCAL_RANK"]) == placement.index and env["DIT_NODE_LOCAL_RANK"] == str(local)


def test_fewer_gpus_than_ranks_fails_naming_counts_and_fix():
    with pytest.raises(DeviceMappingError, match=r"8 ranks on this node but only 4 GPUs visible.*--num_gpus 4"):
        plan_cuda_device(5, 8, 4)
    with pytest.raises(DeviceMappingError, match="8 ranks on this node but only 4 GPUs"):
        plan_cuda_device(1, 8, 4)  # rank 1 could run, but its peers 4..7 cannot: every rank stops alike
    with pytest.raises(DeviceMappingError, match="no GPU is visible"):
        plan_cuda_device(0, 1, 0)
    with pytest.raises(DeviceMappingError, match="LOCAL_RANK=3 is not a rank of LOCAL_WORLD_SIZE=2"):
        plan_cuda_device(3, 2, 8)


def test_pick_device_fails_fast_before_touching_the_gpu(monkeypatch):
    from trainer.engine import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(DeviceMappingError, match="4 ranks on this node but only 2 GPUs"):
        device.pick_device()


def test_two_ranks_on_one_physical_gpu_are_named():
    ok = [("n1", "GPU-a", 0), ("n1", "GPU-b", 1), ("n2", "GPU-a", 2)]  # same uuid string on another host is fine
    assert shared_gpu_problem(ok) == ""
    bad = ok + [("n1", "GPU-b", 3)]
    assert "ranks [1, 3] share GPU GPU-b on n1" in shared_gpu_problem(bad)


# --------------------------------------------------------------------------- item 6: TF32 and the MFU peak


def test_tf32_config_key_defaults_on_and_resolves_per_device():
    assert load_config("configs/tiny.yaml").train.tf32 is True
    assert load_config("configs/tiny.yaml", ["train.tf32=false"]).train.tf32 is False
    assert tf32_in_effect("fp32", True, "cuda", (8, 0)) and tf32_in_effect("fp32", True, "cuda", (9, 0))
    assert not tf32_in_effect("fp32", True, "cuda", (7, 0))  # V100: no TF32 units
    assert not tf32_in_effect("fp32", False, "cuda", (9, 0))
    assert not tf32_in_effect("fp32", True, "cpu")


@pytest.fixture
def tf32_switches():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_configure_sets_torch_switches_and_the_peak_follows_them(monkeypatch, tf32_switches):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    assert configure_matmul_precision("fp32", True, cuda) == "tf32"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert telemetry.peak_tflops(0, cuda, math_mode("fp32", cuda)) == (156.0, "table (NVIDIA A100-SXM4-80GB, tf32)")
    assert configure_matmul_precision("fp32", False, cuda) == "fp32"
    assert not torch.backends.cuda.matmul.allow_tf32
    assert telemetry.peak_tflops(0, cuda, math_mode("fp32", cuda))[0] == 19.5  # full fp32: the fp32 peak
    assert configure_matmul_precision("bf16", True, cuda) == "bf16"
    assert telemetry.peak_tflops(0, cuda, "bf16")[0] == 312.0
    # on CPU the CUDA switch is irrelevant (and left alone): fp32 math, measured fp32 peak
    torch.backends.cuda.matmul.allow_tf32 = True
    assert configure_matmul_precision("fp32", True, torch.device("cpu")) == "fp32"


# --------------------------------------------------------------------------- item 8: shipped JSONs, fill, planner


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_zero_jsons_carry_gpu_settings(name):
    z = load_ds_config(name)["zero_optimization"]
    assert z["overlap_comm"] is True and z["contiguous_gradients"] is True
    for section in ("offload_optimizer", "offload_param"):
        if section in z:
            assert z[section]["pin_memory"] is True


@pytest.mark.parametrize("name", SHIPPED)
def test_fill_applies_cpu_choices_only_on_cpu(name):
    cfg = load_config("configs/tiny.yaml")
    raw = load_ds_config(name)
    gpu = fill_ds_config(raw, cfg, global_batch=8, micro_batch=4, data_parallel=2, on_cuda=True)
    cpu = fill_ds_config(raw, cfg, global_batch=8, micro_batch=4, data_parallel=2, on_cuda=False)
    assert gpu["zero_optimization"] == raw["zero_optimization"]
    changed = apply_cpu_choices(copy.deepcopy(raw))
    assert changed  # every shipped JSON has at least overlap_comm
    expected = copy.deepcopy(raw["zero_optimization"])
    expected["overlap_comm"] = CPU_CHOICES["overlap_comm"][0]
    for section in ("offload_optimizer", "offload_param"):
        if section in expected:
            expected[section]["pin_memory"] = CPU_CHOICES["pin_memory"][0]
    assert cpu["zero_optimization"] == expected
    assert {k: v for k, v in cpu.items() if k != "zero_optimization"} == \
        {k: v for k, v in gpu.items() if k != "zero_optimization"}


@pytest.mark.parametrize("zero,offload", [(1, False), (2, False), (2, True), (3, False), (3, True)])
def test_planner_json_is_the_shipped_json_with_model_sized_buckets(zero, offload):
    from cluster.memory_model import count_params, dit_kwargs, model_state_bytes
    from cluster.plan import BUCKET_KEYS, ds_config_for, shipped_ds_name

    planned = ds_config_for(zero, offload, 675e6)["zero_optimization"]
    shipped = load_ds_config(shipped_ds_name(zero, offload))["zero_optimization"]
    strip = lambda z: {k: v for k, v in z.items() if k not in BUCKET_KEYS}  # noqa: E731
    assert strip(planned) == strip(shipped)
    assert set(planned) == set(shipped)
    # and the memory model reads the same overlap setting the run will use: double buckets on GPU only
    counts = count_params(dit_kwargs("DiT-S/2", 256))
    gpu = model_state_bytes(counts, {"zero_optimization": planned}, dp=8)
    cpu_ds = {"zero_optimization": copy.deepcopy(planned)}
    apply_cpu_choices(cpu_ds)
    cpu = model_state_bytes(counts, cpu_ds, dp=8)
    if zero in (1, 2):
        assert gpu["transient"] == pytest.approx(2 * cpu["transient"])
    assert gpu["total"] == cpu["total"]


# --------------------------------------------------------------------------- item 9: the VAE on the training device


def test_grid_vae_is_loaded_once_on_the_training_device_and_decodes_there(demo_root, monkeypatch):
    """The meta device stands in for a GPU: a VAE whose tensors stayed on the CPU, or a decode that went through the
    host (the old ``latents.cpu()``), cannot produce a meta tensor."""
    import data_pipeline.vae as vae_module
    from trainer.config.shards import open_shard_set
    from trainer.loop import grids

    shards = open_shard_set(demo_root, 64)
    loads, real = [], vae_module.load_vae_from_manifest
    monkeypatch.setattr(vae_module, "load_vae_from_manifest",
                        lambda *a, **k: loads.append(k.get("device")) or real(*a, **k))
    monkeypatch.setattr(grids, "_VAES", {})
    meta = torch.device("meta")
    vae = grids.grid_vae(shards, meta)
    assert grids.grid_vae(shards, meta) is vae and loads == [meta]  # loaded once, on the requested device
    images = vae.decode(torch.zeros(2, *shards.latent_shape, device=meta))  # (2, C, h, w) latents
    assert images.device == meta and tuple(images.shape) == (2, 3, 64, 64)
    on_cpu = grids.grid_vae(shards, torch.device("cpu"))  # another device: its own copy, real numbers
    assert loads == [meta, torch.device("cpu")]
    assert torch.isfinite(on_cpu.decode(torch.zeros(1, *shards.latent_shape))).all()
