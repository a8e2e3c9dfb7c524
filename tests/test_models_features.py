"""Gradient checkpointing, any resolution, cross-resolution loading and bf16 autocast."""
import pytest
import torch

from models import DiT, create_diffusion


def randomised(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(input_size=8, hidden_size=64, depth=4, num_heads=4, num_classes=10)
    args.update(kw)
    model = DiT(**args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    return model


def grads_of(model, x, t, y):
    model.zero_grad(set_to_none=True)
    model(x, t, y, force_drop_ids=torch.zeros_like(y)).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_gives_identical_gradients(every):
    model = randomised()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 2])
    plain = grads_of(model, x, t, y)
    model.set_grad_checkpointing(every)
    checkpointed = grads_of(model, x, t, y)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5), name


def test_gradient_checkpointing_recomputes_only_selected_blocks():
    model = randomised(grad_checkpoint=2)
    calls = [0] * 4
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 2])
    model(x, t, y).sum().backward()
    assert calls == [2, 1, 2, 1]  # blocks 0 and 2 run again in backward
    with torch.no_grad():
        model(x, t, y)
    assert calls == [3, 2, 3, 2]  # no checkpointing without grad


def test_one_model_runs_latents_8_16_32():
    model = randomised()
    for size in (8, 16, 32):
        x = torch.randn(2, 4, size, size)
        out = model(x, torch.tensor([1, 2]), torch.tensor([3, 4]))
        assert out.shape == (2, 8, size, size) and torch.isfinite(out).all()
    out = model(torch.randn(1, 4, 8, 16), torch.tensor([1]), torch.tensor([3]))  # non-square grid
    assert out.shape == (1, 8, 8, 16)


def test_on_the_fly_table_equals_set_input_size():
    model = randomised().eval()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([3, 4])
    with torch.no_grad():
        on_the_fly = model(x, t, y)
        model.set_input_size(16)
        assert model.pos_embed.shape == (1, 64, 64)
        assert torch.equal(model(x, t, y), on_the_fly)
        fresh = DiT(input_size=16, hidden_size=64, depth=4, num_heads=4, num_classes=10)
        assert torch.equal(model.pos_embed, fresh.pos_embed)


def test_interpolated_table_scales_coordinates():
    model = randomised(input_size=8)  # base grid 4x4
    model.set_input_size(16, interpolate=True)  # 8x8 grid; coordinates index * 4/8
    plain = DiT(input_size=8, hidden_size=64, depth=1, num_heads=4).pos_embed[0]  # (16, 64)
    table = model.pos_embed[0].reshape(8, 8, 64)
    assert torch.allclose(table[2, 4], plain[1 * 4 + 2], atol=1e-6)  # row 2 -> 1, col 4 -> 2


def test_load_state_dict_from_another_resolution():
    big = randomised(input_size=16)
    small = DiT(input_size=8, hidden_size=64, depth=4, num_heads=4, num_classes=10)
    own_table = small.pos_embed.detach().clone()
    result = small.load_state_dict(big.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(small.pos_embed, own_table)  # recomputed for the 8x8 input, not copied
    assert torch.equal(small.blocks[2].attn.qkv.weight, big.blocks[2].attn.qkv.weight)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([3, 4])
    with torch.no_grad():
        assert torch.allclose(small.eval()(x, t, y), big.eval()(x, t, y), atol=1e-6)


def test_bf16_autocast_forward_backward_returns_fp32_loss():
    model = randomised(seed=1)
    diffusion = create_diffusion("")
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    noise = torch.randn_like(x)
    kwargs = dict(y=torch.tensor([1, 2]))
    fp32 = diffusion.training_losses(model, x, t, kwargs, noise=noise)["loss"].mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, kwargs["y"])
        loss = diffusion.training_losses(model, x, t, kwargs, noise=noise)["loss"].mean()
    assert out.dtype == torch.float32 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(fp32.item(), rel=0.05)
    loss.backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    grad = model.blocks[0].attn.qkv.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
