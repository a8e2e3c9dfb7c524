"""Device tests: what only a CUDA GPU can show. Marked ``cuda``; on a machine without one they are skipped with
the reason (tests/conftest.py). ``bash benchmarks/gpu_check.sh`` runs them, then times DiT-XL/2.

Each test builds small models (no downloads) and compares against the CPU or an eager/fp32 reference.
"""
import json
import os

import pytest
import torch

from tests.runs import read_metrics, run_training

pytestmark = pytest.mark.cuda


def _tiny(seed: int = 0, grad_checkpoint: int = 0):
    from models import DiTArgs

    torch.manual_seed(seed)
    args = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=4, num_classes=10,
                class_dropout_prob=0.0)  # no random label drop: CPU and GPU runs see the same labels
    model = DiTArgs(**args).build(grad_checkpoint=grad_checkpoint)
    with torch.no_grad():  # non-zero adaLN and head (zero-initialised), so every weight takes part
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.02 * torch.randn_like(p))
    return model


def _batch(device, n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 16, 16, generator=g)  # (N, C, H, W)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    target = torch.randn(n, 8, 16, 16, generator=g)  # (N, 2C, H, W): learned sigma
    return [v.to(device) for v in (x, t, y, target)]


def _loss_and_grads(model, batch, autocast=None):
    x, t, y, target = batch
    with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
        out = model(x, t, y)
    loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_fp32_forward_backward_matches_cpu(no_tf32):
    cpu_loss, cpu_grads = _loss_and_grads(_tiny(), _batch("cpu"))
    gpu_loss, gpu_grads = _loss_and_grads(_tiny().cuda(), _batch("cuda"))
    assert gpu_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-5)
    for name, g in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_step_tracks_fp32(dtype, no_tf32):
    ref_loss, ref_grads = _loss_and_grads(_tiny().cuda(), _batch("cuda"))
    model = _tiny().cuda()
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x, t, y, target = _batch("cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = model(x, t, y)
    loss = torch.nn.functional.mse_loss(out.float(), target)
    scaler.scale(loss).backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()]))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    assert norm.item() == pytest.approx(ref_norm.item(), rel=5e-2)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_sdpa_runs_a_fused_kernel_in_bf16():
    """Restricting SDPA to flash / memory-efficient attention raises if only the math kernel could run; the profiler
    then names the one selected."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    model = _tiny().cuda()
    x, t, y, _ = _batch("cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16), \
                sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            model(x, t, y).float().pow(2).mean().backward()
        torch.cuda.synchronize()
    names = " ".join(e.name.lower() for e in prof.events())
    assert "flash" in names or "efficient" in names, "no fused attention kernel in the profile"


def test_compiled_blocks_train_like_eager():
    from trainer.engine.compile import compile_blocks, compile_report

    eager_loss, eager_grads = _loss_and_grads(_tiny().cuda(), _batch("cuda"), torch.bfloat16)
    model = _tiny().cuda()
    assert compile_blocks(model) == 2
    loss, grads = _loss_and_grads(model, _batch("cuda"), torch.bfloat16)
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-2)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=5e-2, atol=5e-3, msg=name)
    assert compile_report()["graph_breaks"] == 0


def test_activation_checkpointing_gives_the_same_gradients(no_tf32):
    ref_loss, ref_grads = _loss_and_grads(_tiny().cuda(), _batch("cuda"))
    loss, grads = _loss_and_grads(_tiny(grad_checkpoint=1).cuda(), _batch("cuda"))
    assert loss.item() == ref_loss.item()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_ema_updates_on_the_device():
    from trainer.state.ema import EMA

    model = _tiny().cuda()
    ema = EMA(model, decay=0.9, comm_device="cuda")
    assert all(s.device.type == "cuda" for s in ema.shadow)
    start = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for s0, s, p in zip(start, ema.shadow, ema.params):
        torch.testing.assert_close(s, 0.9 * s0 + 0.1 * p.detach().float())
    full = ema.full_tensors()
    assert all(v.device.type == "cpu" for v in full.values()) and len(full) == len(ema.names)


# --------------------------------------------------------------------------- the trainer on one GPU

RUNS = {  # ds config, precision: every ZeRO stage, both 16-bit modes, TF32 fp32 with parameter offload
    "zero1_bf16": ("zero1.json", "bf16"),
    "zero2_fp16": ("zero2.json", "fp16"),
    "zero3_bf16": ("zero3.json", "bf16"),
    "zero3_offload_fp32": ("zero3_offload.json", "fp32"),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_one_gpu_trainer_run(name, demo_root, tmp_path):
    ds_config, precision = RUNS[name]
    run_dir = str(tmp_path / name)
    run_training(1, [f"data.root={demo_root}", f"run.dir={run_dir}", "train.max_steps=6", "log.every=2",
                     f"train.precision={precision}", "checkpoint.every=3", "sample.steps=4"],
                 ds_config=ds_config, launcher="deepspeed", timeout=400)
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in records)
    assert all(r["mem_max_allocated_gb"] > 0 for r in records)  # the model really lived on the GPU
    assert os.path.exists(os.path.join(run_dir, "samples", "final.png"))  # EMA gathered (offload: from host)
    with open(os.path.join(run_dir, "ds_config.json")) as f:
        assert json.load(f)["zero_optimization"]["overlap_comm"] is True  # GPU settings kept
    with open(os.path.join(run_dir, "events.jsonl")) as f:
        started = [e for e in map(json.loads, f) if e.get("event") == "started"][-1]
    expected_math = {"fp32": "tf32", "bf16": "bf16", "fp16": "fp16"}[precision]
    if torch.cuda.get_device_capability() < (8, 0) and precision == "fp32":
        expected_math = "fp32"
    assert started["math"] == expected_math
    if precision == "fp16":
        assert all(r["loss_scale"] > 1 for r in records)
