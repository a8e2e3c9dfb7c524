"""Rectified flow (linear interpolant, velocity target), the SiT/SD3 objective, for the same DiT.

Convention: t = 0 is data, t = 1 is noise.
    x_t = (1 - t) * x_0 + t * noise,    velocity v = dx_t/dt = noise - x_0.
The model is called with t * timestep_scale (1000) so a DiT built for 1000 discrete steps sees its usual
timestep range; with a learned-sigma DiT (2C outputs) the first C channels are the velocity.
Sampling integrates dx/dt = v from t = 1 to t = 0 on a uniform grid (Euler, or Heun's 2nd order).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .diffusion.diffusion_utils import mean_flat

T_EPS = 1e-5  # sampled t stay inside (0, 1)


class RectifiedFlow:
    """Training losses, timestep sampling and ODE samplers of a linear-interpolant flow."""

    kind = "flow"

    def __init__(self, timestep_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 timestep_scale: float = 1000.0):
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown timestep_sampling {timestep_sampling!r}; expected 'uniform' or 'logit_normal'")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std!r}")
        self.timestep_sampling = timestep_sampling
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.timestep_scale = float(timestep_scale)

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> torch.Tensor:
        """(n,) float32 t in (0, 1): uniform, or sigmoid(N(logit_mean, logit_std)) (SD3's logit-normal)."""
        gen_device = generator.device if generator is not None else "cpu"
        if self.timestep_sampling == "uniform":
            t = torch.rand(n, generator=generator, device=gen_device)
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=gen_device))
        t = t.clamp(T_EPS, 1.0 - T_EPS)
        return t.to(device) if device is not None else t

    @staticmethod
    def interpolate(x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x_start.dtype).view(-1, *([1] * (x_start.ndim - 1)))
        return (1.0 - t) * x_start + t * noise

    def model_inputs(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, model timestep): what ``training_losses`` feeds the network (the interpolant, t * timestep_scale),
        for callers that run the network themselves (the pipeline's first stage)."""
        return self.interpolate(x_start, noise, t), t * self.timestep_scale

    def velocity(self, model_fn: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None) -> torch.Tensor:
        """Model velocity at (x, t): the model sees t * timestep_scale; extra (sigma) channels are dropped."""
        out = model_fn(x, t * self.timestep_scale, **(model_kwargs or {}))
        return out[:, : x.shape[1]] if out.shape[1] != x.shape[1] else out

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict[str, torch.Tensor]:
        """Per-sample (N,) {"loss", "mse", "vb"}: loss = mse = mean((v_model - (noise - x_0))^2), vb = 0."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.interpolate(x_start, noise, t)
        prediction = self.velocity(model, x_t, t, model_kwargs)
        mse = mean_flat((noise - x_start - prediction.float()) ** 2)
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, model_fn: Callable, shape=None, noise: torch.Tensor | None = None, steps: int = 50,
               method: str = "euler", model_kwargs: dict | None = None, progress: bool = False,
               device: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Integrate from noise (t = 1) to data (t = 0) in `steps` uniform steps; model_fn may be a CFG forward.

        Heun costs two model calls per step (predictor at t_i, corrector at t_{i+1}).
        """
        if method not in ("euler", "heun"):
            raise ValueError(f"unknown flow sampler {method!r}; expected 'euler' or 'heun'")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if noise is None:
            if shape is None:
                raise ValueError("sample needs noise or shape")
            noise = torch.randn(*shape, generator=generator, device=device or "cpu")
        x = noise
        times = torch.linspace(1.0, 0.0, steps + 1, device=x.device)
        indices = range(steps)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t_now = times[i].expand(x.shape[0])
            t_next = times[i + 1].expand(x.shape[0])
            dt = times[i + 1] - times[i]  # negative
            v_now = self.velocity(model_fn, x, t_now, model_kwargs).to(x.dtype)
            x_euler = x + dt * v_now
            if method == "euler":
                x = x_euler
            else:
                v_next = self.velocity(model_fn, x_euler, t_next, model_kwargs).to(x.dtype)
                x = x + dt * 0.5 * (v_now + v_next)
        return x
