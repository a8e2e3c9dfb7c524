"""Gaussian diffusion against numbers derived by hand from the DDPM/ADM/DDIM formulas (float64)."""
import math

import numpy as np
import pytest
import torch

from models.diffusion import (
    LossType,
    ModelVarType,
    create_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)
from models.diffusion.diffusion_utils import normal_kl

BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
ABAR = np.cumprod(1 - BETAS)


def abar(t):
    return 1.0 if t < 0 else float(ABAR[t])


def posterior_variance(t):
    return BETAS[t] * (1 - abar(t - 1)) / (1 - abar(t))


class ConstantModel:
    """A 'model' returning a fixed (B, 2C, ...) output and recording the timesteps it was called with."""

    def __init__(self, output):
        self.output = output
        self.seen = []

    def __call__(self, x, t, **kwargs):
        self.seen.append(t.clone())
        return self.output


def test_linear_and_cosine_schedules():
    assert np.array_equal(get_named_beta_schedule("linear", 1000), BETAS)
    half = get_named_beta_schedule("linear", 500)
    assert half[0] == pytest.approx(2e-4) and half[-1] == pytest.approx(0.04)
    cos = get_named_beta_schedule("squaredcos_cap_v2", 1000)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 500, 998):
        assert cos[i] == pytest.approx(1 - f((i + 1) / 1000) / f(i / 1000), rel=1e-12)
    assert cos[-1] == 0.999  # capped
    with pytest.raises(ValueError, match="sigmoid"):
        get_named_beta_schedule("sigmoid", 10)


def test_q_sample_by_hand():
    d = create_diffusion("")
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 499, 999])
    xt = d.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        expected = math.sqrt(abar(ti)) * x0[i].double() + math.sqrt(1 - abar(ti)) * noise[i].double()
        assert torch.allclose(xt[i].double(), expected, atol=1e-6)


def test_posterior_variance_and_clipped_log_variance():
    d = create_diffusion("")
    for t in (1, 2, 500, 999):
        assert d.posterior_variance[t] == pytest.approx(posterior_variance(t), rel=1e-12)
        assert d.posterior_log_variance_clipped[t] == pytest.approx(math.log(posterior_variance(t)), rel=1e-12)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(posterior_variance(1)), rel=1e-12)
    x0, xt = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, torch.tensor([300]))
    c1 = BETAS[300] * math.sqrt(abar(299)) / (1 - abar(300))
    c2 = (1 - abar(299)) * math.sqrt(1 - BETAS[300]) / (1 - abar(300))
    assert torch.allclose(mean.double(), c1 * x0.double() + c2 * xt.double(), atol=1e-6)
    assert var.flatten()[0].item() == pytest.approx(posterior_variance(300), rel=1e-6)


def test_p_mean_variance_learned_range_by_hand():
    d = create_diffusion("")
    x = torch.randn(2, 2, 3, 3) * 0.5
    eps, v = torch.randn(2, 2, 3, 3) * 0.3, torch.rand(2, 2, 3, 3) * 2 - 1
    model = ConstantModel(torch.cat([eps, v], dim=1))
    t = torch.tensor([7, 640])
    out = d.p_mean_variance(model, x, t, clip_denoised=True)
    for i, ti in enumerate(t.tolist()):
        x0 = (x[i].double() - math.sqrt(1 - abar(ti)) * eps[i].double()) / math.sqrt(abar(ti))
        x0 = x0.clamp(-1, 1)
        c1 = BETAS[ti] * math.sqrt(abar(ti - 1)) / (1 - abar(ti))
        c2 = (1 - abar(ti - 1)) * math.sqrt(1 - BETAS[ti]) / (1 - abar(ti))
        frac = (v[i].double() + 1) / 2
        logvar = frac * math.log(BETAS[ti]) + (1 - frac) * math.log(posterior_variance(ti))
        assert torch.allclose(out["pred_xstart"][i].double(), x0, atol=1e-5)
        assert torch.allclose(out["mean"][i].double(), c1 * x0 + c2 * x[i].double(), atol=1e-5)
        assert torch.allclose(out["log_variance"][i].double(), logvar, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_respaced_ddim_step_by_hand(eta):
    d = create_diffusion("ddim50")
    assert d.timestep_map == list(range(0, 1000, 20))
    x = torch.randn(2, 2, 3, 3)
    eps = torch.randn(2, 2, 3, 3) * 0.5
    model = ConstantModel(torch.cat([eps, torch.zeros_like(eps)], dim=1))
    noise = torch.randn_like(x)
    t = torch.tensor([30, 1])  # respaced indices -> original steps 600 and 20
    out = d.ddim_sample(model, x, t, clip_denoised=False, eta=eta, noise=noise)
    assert torch.equal(model.seen[0], torch.tensor([600, 20]))
    for i, (now, prev) in enumerate([(600, 580), (20, 0)]):
        a, ap = abar(now), abar(prev)
        x0 = (x[i].double() - math.sqrt(1 - a) * eps[i].double()) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
        expected = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps[i].double() + sigma * noise[i].double()
        assert torch.allclose(out["sample"][i].double(), expected, atol=1e-5)
    last = d.ddim_sample(model, x, torch.tensor([0, 0]), clip_denoised=False, eta=eta, noise=noise)
    x0 = (x.double() - math.sqrt(1 - abar(0)) * eps.double()) / math.sqrt(abar(0))
    assert torch.allclose(last["sample"].double(), x0, atol=1e-5)  # final step: no noise, alpha_prev = 1


def discretized_nll_bits(x, mean, log_scale):
    """Per-element -log2 P(x) with the tanh-approximated CDF and 1/255 bins, written out in float64."""
    def cdf(v):
        return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    inv = math.exp(-log_scale)
    plus, minus = cdf(inv * (x - mean + 1 / 255)), cdf(inv * (x - mean - 1 / 255))
    if x < -0.999:
        p = plus
    elif x > 0.999:
        p = 1 - minus
    else:
        p = plus - minus
    return -math.log(max(p, 1e-12)) / math.log(2)


def test_vb_at_t0_is_the_discretized_gaussian_nll():
    d = create_diffusion("")
    x0 = torch.tensor([[[[-1.0, -0.3], [0.2, 1.0]]]])  # (1, 1, 2, 2), includes both edge bins
    eps, v = torch.full_like(x0, 0.1), torch.full_like(x0, 0.4)
    model = ConstantModel(torch.cat([eps, v], dim=1))
    noise = torch.randn_like(x0)
    t = torch.tensor([0])
    x_t = d.q_sample(x0, t, noise)
    vb = d._vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)["output"]
    out = d.p_mean_variance(model, x_t, t, clip_denoised=False)
    expected = np.mean([
        discretized_nll_bits(x0.flatten()[k].item(), out["mean"].flatten()[k].item(), 0.5 * out["log_variance"].flatten()[k].item())
        for k in range(4)
    ])
    assert vb.item() == pytest.approx(expected, rel=1e-5)


def test_training_losses_hybrid_by_hand():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 2, 3, 3, generator=g) * 2 - 1
    noise = torch.randn(2, 2, 3, 3, generator=g)
    eps_out = torch.randn(2, 2, 3, 3, generator=g) * 0.5
    v_out = torch.rand(2, 2, 3, 3, generator=g) * 2 - 1
    model = ConstantModel(torch.cat([eps_out, v_out], dim=1))
    t = torch.tensor([250, 900])
    terms = d.training_losses(model, x0, t, noise=noise)
    for i, ti in enumerate(t.tolist()):
        a, ap, b = abar(ti), abar(ti - 1), BETAS[ti]
        xt = math.sqrt(a) * x0[i].double() + math.sqrt(1 - a) * noise[i].double()
        mse = ((noise[i].double() - eps_out[i].double()) ** 2).mean()
        c1, c2 = b * math.sqrt(ap) / (1 - a), (1 - ap) * math.sqrt(1 - b) / (1 - a)
        true_mean = c1 * x0[i].double() + c2 * xt
        pred_x0 = (xt - math.sqrt(1 - a) * eps_out[i].double()) / math.sqrt(a)
        model_mean = c1 * pred_x0 + c2 * xt
        true_logvar = math.log(posterior_variance(ti))
        frac = (v_out[i].double() + 1) / 2
        model_logvar = frac * math.log(b) + (1 - frac) * true_logvar
        kl = 0.5 * (-1 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar))
        vb = kl.mean() / math.log(2)
        assert terms["mse"][i].item() == pytest.approx(mse.item(), rel=1e-5)
        assert terms["vb"][i].item() == pytest.approx(vb.item(), rel=1e-4, abs=1e-6)
        assert terms["loss"][i].item() == pytest.approx((mse + vb).item(), rel=1e-4)


def test_vb_term_trains_only_the_variance():
    d = create_diffusion("")
    x0, noise = torch.rand(1, 2, 2, 2) * 2 - 1, torch.randn(1, 2, 2, 2)
    output = torch.randn(1, 4, 2, 2, requires_grad=True)
    terms = d.training_losses(lambda x, t: output, x0, torch.tensor([400]), noise=noise)
    (grad,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert torch.count_nonzero(grad[:, :2]) == 0 and torch.count_nonzero(grad[:, 2:]) > 0
    (grad,) = torch.autograd.grad(terms["loss"].sum(), output)
    assert torch.count_nonzero(grad[:, :2]) > 0


def test_loss_variants():
    x0, noise, t = torch.rand(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.tensor([0, 10])
    fixed = create_diffusion("", learn_sigma=False)
    assert fixed.model_var_type == ModelVarType.FIXED_LARGE
    assert create_diffusion("", learn_sigma=False, sigma_small=True).model_var_type == ModelVarType.FIXED_SMALL
    terms = fixed.training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise=noise)
    assert torch.allclose(terms["loss"], (noise**2).mean(dim=(1, 2, 3))) and torch.count_nonzero(terms["vb"]) == 0
    kl = create_diffusion("", use_kl=True)
    assert kl.loss_type == LossType.RESCALED_KL
    model = ConstantModel(torch.zeros(2, 2, 2, 2))
    mse_terms = create_diffusion("").training_losses(model, x0, t, noise=noise)
    kl_terms = kl.training_losses(model, x0, t, noise=noise)
    assert torch.allclose(kl_terms["loss"], mse_terms["vb"] * 1000)
    rescaled = create_diffusion("", rescale_learned_sigmas=True, diffusion_steps=500)
    assert rescaled.loss_type == LossType.RESCALED_MSE
    start = create_diffusion("", predict_xstart=True)
    out = start.training_losses(lambda x, t: torch.cat([x0, torch.zeros_like(x0)], 1), x0, t, noise=noise)
    assert torch.count_nonzero(out["mse"]) == 0


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    spaced = space_timesteps(1000, "250")
    assert len(spaced) == 250 and min(spaced) == 0 and max(spaced) == 999
    assert space_timesteps(100, "10,5") == {0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99}
    assert space_timesteps(1000, "ddim7") == set(range(0, 1000, 143))
    with pytest.raises(ValueError, match="999"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="20"):
        space_timesteps(10, "20")


def test_spaced_diffusion_keeps_alphas_cumprod():
    d = create_diffusion("250")
    assert d.num_timesteps == 250
    assert np.allclose(d.alphas_cumprod, ABAR[d.timestep_map], rtol=1e-12)


def test_sample_timesteps_uses_the_generator():
    d = create_diffusion("")
    a = d.sample_timesteps(64, torch.Generator().manual_seed(7))
    b = d.sample_timesteps(64, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert torch.equal(a, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(7)))
    big = d.sample_timesteps(20000, torch.Generator().manual_seed(1))
    assert big.min() == 0 and big.max() == 999


def test_sample_loops_visit_every_respaced_step():
    d = create_diffusion("10")
    model = ConstantModel(torch.zeros(2, 4, 4, 4))
    noise = torch.randn(2, 2, 4, 4)
    a = d.p_sample_loop(model, (2, 2, 4, 4), noise=noise, clip_denoised=False)
    assert [int(t[0]) for t in model.seen] == sorted(d.timestep_map, reverse=True)
    model.seen.clear()
    b = d.ddim_sample_loop(model, (2, 2, 4, 4), noise=noise, clip_denoised=False)
    c = d.ddim_sample_loop(model, (2, 2, 4, 4), noise=noise, clip_denoised=False)
    assert a.shape == b.shape == (2, 2, 4, 4) and torch.equal(b, c)
    # zero eps: DDIM maps x_T to x_T / sqrt(abar_T) exactly
    assert torch.allclose(b.double(), noise.double() / math.sqrt(abar(999)), rtol=1e-4)


def test_normal_kl_formula():
    kl = normal_kl(torch.tensor(1.0), 0.0, 0.0, math.log(4.0))
    assert kl.item() == pytest.approx(0.5 * (math.log(4) + 1 / 4 + 1 / 4 - 1))
