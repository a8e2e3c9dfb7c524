"""build_objective: one interface over diffusion and flow for the trainer and the sample tool."""
import pytest
import torch

from models import DiT, build_objective, create_diffusion
from models.flow import RectifiedFlow


def tiny():
    torch.manual_seed(0)
    model = DiT(input_size=8, hidden_size=32, depth=1, num_heads=4, num_classes=10).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.normal_(0, 0.05)
    return model


def test_diffusion_objective_delegates_to_create_diffusion():
    objective = build_objective("diffusion", noise_schedule="linear")
    reference = create_diffusion("")
    model = tiny()
    x, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = objective.sample_timesteps(2, torch.Generator().manual_seed(0))
    assert torch.equal(t, reference.sample_timesteps(2, torch.Generator().manual_seed(0)))
    kwargs = dict(y=torch.tensor([1, 2]))
    a = objective.training_losses(model, x, t, kwargs, noise=noise)
    b = reference.training_losses(model, x, t, kwargs, noise=noise)
    assert set(a) == {"loss", "mse", "vb"} and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_diffusion_sample_respaces_to_steps(method):
    objective = build_objective("diffusion")
    model = tiny()
    calls = []

    def model_fn(x, t, y):
        calls.append(int(t[0]))
        return model(x, t, y)

    noise = torch.randn(2, 4, 8, 8)
    torch.manual_seed(5)
    out = objective.sample(model_fn, noise.shape, noise=noise, steps=5, method=method, model_kwargs=dict(y=torch.tensor([1, 2])))
    assert calls == sorted(create_diffusion("5").timestep_map, reverse=True)
    torch.manual_seed(5)
    loop = getattr(create_diffusion("5"), "p_sample_loop" if method == "ddpm" else "ddim_sample_loop")
    expected = loop(model, noise.shape, noise=noise, clip_denoised=False, model_kwargs=dict(y=torch.tensor([1, 2])))
    assert torch.equal(out, expected)


def test_flow_objective():
    objective = build_objective("flow", timestep_sampling="uniform")
    assert isinstance(objective, RectifiedFlow)
    t = objective.sample_timesteps(4, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and (t > 0).all() and (t < 1).all()
    out = objective.sample(tiny(), (2, 4, 8, 8), steps=2, method="euler", model_kwargs=dict(y=torch.tensor([1, 2])))
    assert out.shape == (2, 4, 8, 8)


def test_unknown_kind_and_method():
    with pytest.raises(ValueError, match="gan"):
        build_objective("gan")
    with pytest.raises(ValueError, match="euler"):
        build_objective("diffusion").sample(tiny(), (1, 4, 8, 8), steps=2, method="euler")
