"""Gaussian diffusion as configured by DiT: `create_diffusion` mirrors the reference's diffusion/__init__.py."""
from __future__ import annotations

from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from .respace import SpacedDiffusion, space_timesteps


def create_diffusion(
    timestep_respacing,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """DiT's diffusion: "" or None -> all diffusion_steps; "250" or "ddim50" -> respaced for sampling.

    Defaults give DiT training: linear betas, epsilon prediction, learned-range variance, loss = mse + vb.
    """
    if not isinstance(diffusion_steps, int) or diffusion_steps < 1:
        raise ValueError(f"diffusion_steps must be a positive int, got {diffusion_steps!r}")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    elif isinstance(timestep_respacing, int):
        timestep_respacing = [timestep_respacing]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=(
            ModelVarType.LEARNED_RANGE if learn_sigma
            else (ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE)
        ),
        loss_type=loss_type,
    )


__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "get_named_beta_schedule",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
]
