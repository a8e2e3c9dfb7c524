"""One interface for the trainer over the two training objectives (Gaussian diffusion, rectified flow).

Both expose sample_timesteps(n, generator, device), training_losses(model, x_start, t, model_kwargs, noise),
model_inputs(x_start, t, noise) -> (x_t, model timestep) and sample(model_fn, shape, noise, steps, method, model_kwargs, progress).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .diffusion import create_diffusion
from .flow import RectifiedFlow


class DiffusionObjective:
    """DiT's Gaussian diffusion for training (all steps), respaced on the fly for sampling."""

    kind = "diffusion"

    def __init__(self, **diffusion_kwargs: Any):
        diffusion_kwargs.pop("timestep_respacing", None)
        self.diffusion_kwargs = diffusion_kwargs
        self.diffusion = create_diffusion(timestep_respacing="", **diffusion_kwargs)
        self.num_timesteps = self.diffusion.num_timesteps

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> torch.Tensor:
        return self.diffusion.sample_timesteps(n, generator=generator, device=device)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict[str, torch.Tensor]:
        return self.diffusion.training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=noise)

    def model_inputs(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, model timestep): what ``training_losses`` feeds the network, for callers that run the network
        themselves (the pipeline's first stage). x_t = q_sample(x_0, t, noise); the model sees the integer t."""
        return self.diffusion.q_sample(x_start, t, noise=noise), t

    def sampling_diffusion(self, steps: int):
        """The diffusion respaced to `steps` evenly spread steps (DiT's sample.py: create_diffusion(str(steps)))."""
        return create_diffusion(timestep_respacing=str(steps), **self.diffusion_kwargs)

    @torch.no_grad()
    def sample(self, model_fn: Callable, shape=None, noise: torch.Tensor | None = None, steps: int = 250,
               method: str = "ddpm", model_kwargs: dict | None = None, progress: bool = False,
               device: Any = None, eta: float = 0.0, clip_denoised: bool = False) -> torch.Tensor:
        """Ancestral ("ddpm") or DDIM ("ddim", eta) sampling; latents are not clipped unless asked."""
        if method not in ("ddpm", "ddim"):
            raise ValueError(f"unknown diffusion sampler {method!r}; expected 'ddpm' or 'ddim'")
        if shape is None:
            if noise is None:
                raise ValueError("sample needs noise or shape")
            shape = tuple(noise.shape)
        diffusion = self.sampling_diffusion(steps)
        common = dict(noise=noise, clip_denoised=clip_denoised, model_kwargs=model_kwargs, device=device, progress=progress)
        if method == "ddpm":
            return diffusion.p_sample_loop(model_fn, shape, **common)
        return diffusion.ddim_sample_loop(model_fn, shape, eta=eta, **common)


def build_objective(kind: str = "diffusion", **kwargs: Any):
    """"diffusion": kwargs of create_diffusion (noise_schedule, learn_sigma, ...); "flow": of RectifiedFlow."""
    if kind == "diffusion":
        return DiffusionObjective(**kwargs)
    if kind in ("flow", "rectified_flow"):
        return RectifiedFlow(**kwargs)
    raise ValueError(f"unknown objective kind {kind!r}; expected 'diffusion' or 'flow'")
