"""Rectified flow: interpolant convention, velocity loss, timestep sampling and the ODE samplers."""
import pytest
import torch

from models import DiT, RectifiedFlow


def test_interpolant_and_velocity_loss_by_hand():
    flow = RectifiedFlow()
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    seen = {}

    def model(x, t_model, y):
        seen["x"], seen["t"] = x, t_model
        return torch.cat([torch.full_like(x, 0.25), torch.full_like(x, 7.0)], 1)  # 2C output: sigma ignored

    terms = flow.training_losses(model, x0, t, dict(y=torch.zeros(3, dtype=torch.long)), noise=noise)
    for i, ti in enumerate(t.tolist()):
        assert torch.allclose(seen["x"][i], (1 - ti) * x0[i] + ti * noise[i], atol=1e-6)
        expected = ((noise[i] - x0[i] - 0.25) ** 2).mean()
        assert terms["loss"][i].item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(seen["t"], t * 1000)
    assert torch.equal(terms["mse"], terms["loss"]) and torch.count_nonzero(terms["vb"]) == 0


def test_endpoints_of_the_interpolant():
    x0, noise = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    assert torch.equal(RectifiedFlow.interpolate(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(RectifiedFlow.interpolate(x0, noise, torch.ones(2)), noise)


def test_timestep_sampling():
    uniform = RectifiedFlow(timestep_sampling="uniform")
    t = uniform.sample_timesteps(5, torch.Generator().manual_seed(0))
    assert torch.allclose(t, torch.rand(5, generator=torch.Generator().manual_seed(0)).clamp(1e-5, 1 - 1e-5))
    ln = RectifiedFlow(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = ln.sample_timesteps(5, torch.Generator().manual_seed(0))
    z = torch.randn(5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(t, torch.sigmoid(0.5 + 0.8 * z))
    many = ln.sample_timesteps(50000, torch.Generator().manual_seed(1))
    assert many.min() > 0 and many.max() < 1
    assert torch.logit(many.double()).mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.logit(many.double()).std().item() == pytest.approx(0.8, abs=0.02)


def test_euler_recovers_a_point_mass_exactly():
    """For data = one point a, the true velocity is (x - a) / t and Euler from t=1 lands on a."""
    flow = RectifiedFlow()
    a = torch.randn(2, 4, 4, 4)
    noise = torch.randn(2, 4, 4, 4)

    def true_velocity(x, t_model):
        t = (t_model / 1000).view(-1, 1, 1, 1)
        return (x - a) / t

    out = flow.sample(true_velocity, noise=noise, steps=7, method="euler")
    assert torch.allclose(out, a, atol=1e-5)


def test_heun_is_exact_for_velocity_linear_in_time_and_euler_is_not():
    flow = RectifiedFlow()
    noise = torch.randn(1, 2, 2, 2)
    slope = torch.randn(1, 2, 2, 2)
    field = lambda x, t_model: slope * (t_model / 1000).view(-1, 1, 1, 1)  # noqa: E731
    exact = noise - slope / 2  # x(0) = x(1) - integral_0^1 slope * t dt
    heun = flow.sample(field, noise=noise, steps=4, method="heun")
    euler = flow.sample(field, noise=noise, steps=4, method="euler")
    assert torch.allclose(heun, exact, atol=1e-6)
    # Euler from t=1 takes left Riemann sums: error = slope * (1/(2*steps))
    assert torch.allclose(euler - exact, -slope / 8, atol=1e-6)


def test_sample_with_a_dit_and_cfg_model_fn():
    torch.manual_seed(0)
    model = DiT(input_size=8, hidden_size=32, depth=1, num_heads=4, num_classes=10).eval()
    flow = RectifiedFlow()
    noise = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    kwargs = dict(y=torch.tensor([1, 2, 10, 10]), cfg_scale=2.0)
    out = flow.sample(model.forward_with_cfg, noise=noise, steps=3, method="heun", model_kwargs=kwargs)
    assert out.shape == noise.shape
    assert torch.equal(out, noise)  # zero-initialised DiT predicts zero velocity


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        RectifiedFlow(timestep_sampling="beta")
    with pytest.raises(ValueError, match="rk4"):
        RectifiedFlow().sample(lambda x, t: x, noise=torch.zeros(1, 1, 2, 2), method="rk4")
    with pytest.raises(ValueError, match="0"):
        RectifiedFlow().sample(lambda x, t: x, noise=torch.zeros(1, 1, 2, 2), steps=0)
    with pytest.raises(ValueError, match="-1"):
        RectifiedFlow(logit_std=-1)
