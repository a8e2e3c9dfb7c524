"""Timestep respacing: run a diffusion trained on T steps with a subset of its steps (ADM's SpacedDiffusion)."""
from __future__ import annotations

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Which of num_timesteps steps to keep.

    section_counts: "ddimN" -> an exact integer stride giving N steps (range(0, T, stride));
    "a,b,c" or a list -> split the T steps into equal sections and take a, b, c evenly spaced steps from each
    (first and last step of a section included), e.g. "250" -> 250 steps spread over [0, T).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired_count} steps from {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class _WrappedModel:
    """Calls the model with the original timestep of each respaced index (the model knows T steps)."""

    def __init__(self, model, timestep_map: list[int], original_num_steps: int, maps: dict | None = None):
        self.model = model
        self.timestep_map = timestep_map
        self.original_num_steps = original_num_steps
        self._maps = {} if maps is None else maps  # (device, dtype) -> the map as a tensor, shared per diffusion

    def __call__(self, x, ts, **kwargs):
        map_tensor = self._maps.get((ts.device, ts.dtype))
        if map_tensor is None:  # one host -> device copy per device, not one per sampling step
            map_tensor = self._maps[(ts.device, ts.dtype)] = torch.tensor(self.timestep_map, device=ts.device,
                                                                            dtype=ts.dtype)
        return self.model(x, map_tensor[ts], **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over the kept steps, with betas recomputed so that alphas_cumprod match at those steps."""

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map: list[int] = []
        self.original_num_steps = len(kwargs["betas"])
        base_diffusion = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._timestep_maps: dict = {}

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.original_num_steps, self._timestep_maps)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)
