"""Our Gaussian diffusion against diffusers' DDPMScheduler / DDIMScheduler where their formulas coincide.

diffusers builds its linear betas and their cumulative product in float32; ours (like the reference) in
float64. Near t = 0 the float32 tables lose digits to cancellation (1 - abar_t ~ 1e-4), which moves a
step by ~4e-5, so the step tests hand diffusers our float64 schedule (`float64_schedule`): then the
comparison tests the step formulas alone, to 1e-5.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from models import create_diffusion  # noqa: E402
from tests.test_models_objectives import tiny  # noqa: E402  (the same random tiny DiT)

LINEAR = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def float64_schedule(scheduler, diffusion):
    """Give a diffusers scheduler the float64 tables of our (unrespaced) diffusion."""
    scheduler.betas = torch.from_numpy(diffusion.betas)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.from_numpy(diffusion.alphas_cumprod)
    return scheduler


def test_alphas_cumprod_and_add_noise_equal_q_sample():
    ours = create_diffusion("")
    ref = DDPMScheduler(**LINEAR)
    assert torch.allclose(torch.from_numpy(ours.alphas_cumprod).float(), ref.alphas_cumprod, atol=1e-6)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 1, 500, 999])
    assert torch.allclose(ours.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-5)


def test_posterior_variance_equals_fixed_small():
    ours = create_diffusion("")
    ref = DDPMScheduler(**LINEAR, variance_type="fixed_small")
    for t in (1, 10, 500, 999):
        assert ref._get_variance(t).item() == pytest.approx(ours.posterior_variance[t], abs=1e-6, rel=1e-3)


@pytest.mark.parametrize("t", [1, 37, 500, 999])
def test_learned_range_ddpm_step_equals_p_sample(t):
    ours = create_diffusion("")
    ref = float64_schedule(DDPMScheduler(**LINEAR, variance_type="learned_range", clip_sample=True), ours)
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, 4, 8, 8, generator=g)
    output = torch.cat([0.8 * torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 4, 8, 8, generator=g) * 2 - 1], 1)
    step = ref.step(output, t, x, generator=torch.Generator().manual_seed(99)).prev_sample
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(99))
    ours_out = ours.p_sample(lambda x, t: output, x, torch.full((2,), t), clip_denoised=True, noise=noise)
    assert torch.allclose(ours_out["sample"], step, atol=1e-5)
    out = ours.p_mean_variance(lambda x, t: output, x, torch.full((2,), t))
    noise_part = step - out["mean"]  # diffusers' noise term: exp(0.5 * learned log variance) * noise
    assert torch.allclose(noise_part, torch.exp(0.5 * out["log_variance"]) * noise, atol=1e-5)
    assert noise_part.abs().max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_respaced_ddim_step_equals_ddim_scheduler(eta):
    ours = create_diffusion("ddim50")
    ref = DDIMScheduler(**LINEAR, clip_sample=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    float64_schedule(ref, create_diffusion(""))
    ref.set_timesteps(50)
    assert ref.timesteps.tolist() == ours.timestep_map[::-1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    eps = 0.8 * torch.randn(2, 4, 8, 8, generator=g)
    output = torch.cat([eps, torch.zeros_like(eps)], 1)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    for index in (49, 25, 1, 0):
        t_original = ours.timestep_map[index]
        expected = ref.step(eps, t_original, x, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
        got = ours.ddim_sample(lambda x, t: output, x, torch.full((2,), index), clip_denoised=True, eta=eta, noise=noise)
        assert torch.allclose(got["sample"], expected, atol=1e-5), index


def test_ddim_sample_loop_with_a_dit_equals_ddim_scheduler_loop():
    model = tiny()
    y = torch.tensor([1, 2])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = create_diffusion("ddim10").ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=True,
                                                       model_kwargs=dict(y=y))
    ref = DDIMScheduler(**LINEAR, clip_sample=True, set_alpha_to_one=True, steps_offset=0)
    float64_schedule(ref, create_diffusion(""))
    ref.set_timesteps(10)
    x = noise
    with torch.no_grad():
        for t in ref.timesteps:
            eps = model(x, t.expand(2), y)[:, :4]
            x = ref.step(eps, t, x, use_clipped_model_output=True).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)
