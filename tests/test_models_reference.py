"""Our DiT against diffusers' DiTTransformer2DModel (a port of facebookresearch/DiT) with identical weights.

The real reference needs timm and cannot be installed here. diffusers' port differs from it in one place,
its timestep frequencies (divides by half - 1); `align_diffusers_timestep_embedding` restores the official
function, and the first test shows the difference is real so the alignment is not hiding anything else.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel  # noqa: E402

from models import DiT  # noqa: E402
from models.convert import (  # noqa: E402
    align_diffusers_timestep_embedding,
    diffusers_config,
    diffusers_to_official,
    official_to_diffusers,
)


def randomised_pair(input_size=8, depth=2, hidden=64, heads=4, classes=10, seed=0):
    """Ours and diffusers' model with the same nonzero random weights everywhere (adaLN and head included)."""
    torch.manual_seed(seed)
    ours = DiT(input_size=input_size, hidden_size=hidden, depth=depth, num_heads=heads, num_classes=classes).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    ref = DiTTransformer2DModel(**diffusers_config(ours.config)).eval()
    ref.load_state_dict(official_to_diffusers(ours.state_dict(), ours.config), strict=True)
    return ours, align_diffusers_timestep_embedding(ref)


def inputs(n=4, size=8, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, generator=g)
    t = torch.tensor([0, 13, 500, 999][:n])
    y = torch.tensor([0, 3, 9, classes][:n])  # includes the null class
    return x, t, y


def test_unaligned_diffusers_timestep_embedding_differs():
    ours, ref = randomised_pair()
    unaligned = DiTTransformer2DModel(**diffusers_config(ours.config)).eval()
    unaligned.load_state_dict(ref.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        assert (ours(x, t, y) - unaligned(x, t, y).sample).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_equals_diffusers(seed):
    ours, ref = randomised_pair(seed=seed)
    x, t, y = inputs(seed=seed)
    with torch.no_grad():
        a, b = ours(x, t, y), ref(x, t, y).sample
    assert a.abs().max() > 0.1  # random weights: a meaningful, nonzero output
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_forward_with_cfg_three_channels_equals_reference_formula():
    ours, ref = randomised_pair()
    g = torch.Generator().manual_seed(5)
    half = torch.randn(2, 4, 8, 8, generator=g)
    x = torch.cat([half, half])
    t = torch.tensor([250, 250, 250, 250])
    y = torch.tensor([1, 7, 10, 10])
    scale = 1.5  # the guidance formula amplifies float32 rounding by up to 1 + 2 * scale
    with torch.no_grad():
        ours_cfg = ours.forward_with_cfg(x, t, y, scale, cfg_channels=3)
        out = ref(x, t, y).sample  # the reference's forward_with_cfg, applied to diffusers' outputs
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = eps.split(2)
    half_eps = uncond + scale * (cond - uncond)
    expected = torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
    assert torch.allclose(ours_cfg, expected, atol=1e-5, rtol=0)


def test_gradients_equal_diffusers():
    ours, ref = randomised_pair()
    x, t, y = inputs()
    target = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    ((ours(x, t, y) - target) ** 2).mean().backward()
    ((ref(x, t, y).sample - target) ** 2).mean().backward()
    grads = official_to_diffusers({k: p.grad for k, p in ours.named_parameters() if p.grad is not None} |
                                  {"pos_embed": ours.pos_embed}, ours.config)
    ref_grads = dict(ref.named_parameters())
    for key in ("transformer_blocks.1.attn1.to_k.weight", "transformer_blocks.0.ff.net.0.proj.weight",
                "proj_out_2.weight", "pos_embed.proj.weight", "transformer_blocks.0.norm1.linear.weight"):
        assert torch.allclose(grads[key], ref_grads[key].grad, atol=1e-5, rtol=1e-4), key


def test_conversion_round_trip_is_exact():
    ours, ref = randomised_pair(depth=3)
    back = diffusers_to_official(ref.state_dict(), ours.config)
    assert back.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(back[key], value), key
    fresh = DiT(input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    fresh.load_state_dict(back, strict=True)


def test_untied_diffusers_embedders_are_rejected():
    _, ref = randomised_pair()
    state = dict(ref.state_dict())
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    state[key] = state[key] + 1.0
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                  num_classes=10, learn_sigma=True)
    with pytest.raises(ValueError, match="block 1"):
        diffusers_to_official(state, config)
    assert "t_embedder.mlp.0.weight" in diffusers_to_official(state, config, allow_untied=True)


def test_other_resolution_with_interpolation_equals_diffusers():
    """diffusers rescales positions to its base grid at another size, which is our interpolate=True mode."""
    ours, ref = randomised_pair(input_size=8)
    ours.set_input_size(16, interpolate=True)
    x, t, y = inputs(size=16)
    with torch.no_grad():
        assert torch.allclose(ours(x, t, y), ref(x, t, y).sample, atol=1e-5, rtol=0)
