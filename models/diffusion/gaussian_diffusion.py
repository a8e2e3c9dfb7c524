"""Gaussian diffusion (DDPM/ADM as used by DiT): schedules, losses and samplers.

Numerically the ADM/DiT implementation: schedules and all derived tables in float64 numpy, gathered per
timestep and cast to float32; epsilon or x0 prediction; fixed or learned(-range) variance; the hybrid loss
mse + vb with the vb term computed on a detached mean (only the variance output learns from it).

Each table is cast to float32 once and kept on the device of the timesteps that first asked for it
(``GaussianDiffusion.table``), so a training step gathers from device memory instead of copying 14 float64
tables host → device per ``training_losses`` (each a blocking copy on a GPU). Casting then gathering gives
the same numbers as the reference's gather then cast, bit for bit.
"""
from __future__ import annotations

import enum
import math
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()  # the model outputs log variance
    FIXED_SMALL = enum.auto()  # posterior variance
    FIXED_LARGE = enum.auto()  # beta_t (first entry replaced by the posterior variance)
    LEARNED_RANGE = enum.auto()  # the model outputs v in [-1, 1] interpolating the two logs


class LossType(enum.Enum):
    MSE = enum.auto()  # mse (+ vb when the variance is learned)
    RESCALED_MSE = enum.auto()  # same, vb scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the bound times num_timesteps

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def get_beta_schedule(beta_schedule: str, *, beta_start: float, beta_end: float, num_diffusion_timesteps: int) -> np.ndarray:
    if beta_schedule != "linear":
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; this helper builds 'linear' only")
    betas = np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    assert betas.shape == (num_diffusion_timesteps,)
    return betas


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Betas that make the cumulative product follow alpha_bar(t), t in [0, 1], capped at max_beta."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """"linear": 1e-4..0.02 scaled by 1000/steps (so any step count spans the same noise); "squaredcos_cap_v2"."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule("linear", beta_start=scale * 0.0001, beta_end=scale * 0.02,
                                 num_diffusion_timesteps=num_diffusion_timesteps)
    if schedule_name in ("squaredcos_cap_v2", "cosine"):
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise schedule {schedule_name!r}; expected 'linear' or 'squaredcos_cap_v2'")


def extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: tuple[int, ...]) -> torch.Tensor:
    """arr[timesteps] as float32 on timesteps' device, broadcast to broadcast_shape (batch dim first).

    The reference's helper, for one-off tables; ``GaussianDiffusion`` gathers from its cached device tables."""
    return _broadcast(torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float(), broadcast_shape)


def _broadcast(res: torch.Tensor, broadcast_shape: tuple[int, ...]) -> torch.Tensor:
    """(N,) -> broadcast_shape (N, ...) as a view: the values of ``res + zeros(broadcast_shape)`` without the
    allocation."""
    while res.ndim < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


# Float64 tables a step may gather from; each is cast to float32 and moved to a device at most once.
TABLES = ("betas", "log_betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "one_minus_alphas_cumprod",
          "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
          "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
          "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "fixed_large_variance",
          "fixed_large_log_variance")


class GaussianDiffusion:
    """Training losses and samplers of a discrete-time Gaussian diffusion over num_timesteps steps."""

    def __init__(self, *, betas: np.ndarray, model_mean_type: ModelMeanType, model_var_type: ModelVarType, loss_type: LossType):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the posterior variance, with the t=0 entry (variance 0) replaced by the t=1 entry
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # tables the reference derived inside the step (q's variance, the learned range's upper end, fixed-large)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_betas = np.log(betas)
        if len(betas) > 1:
            self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
            self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        else:
            self.fixed_large_variance = self.fixed_large_log_variance = np.array([])
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.table_builds = 0  # host -> device table copies so far (each table once per device)

    def table(self, name: str, device) -> torch.Tensor:
        """(num_timesteps,) float32 copy of table ``name`` on ``device``, made on first use and kept."""
        key = (name, torch.device(device))
        found = self._device_tables.get(key)
        if found is None:
            found = torch.from_numpy(np.ascontiguousarray(getattr(self, name))).to(torch.float32).to(key[1])
            self._device_tables[key] = found
            self.table_builds += 1
        return found

    def _extract(self, name: str, t: torch.Tensor, broadcast_shape: tuple[int, ...]) -> torch.Tensor:
        """table ``name`` at timesteps ``t`` (N,), broadcast to ``broadcast_shape`` (N, ...), on t's device."""
        return _broadcast(self.table(name, t.device)[t], broadcast_shape)

    # ------------------------------------------------------------------ timesteps
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> torch.Tensor:
        """(n,) int64 uniform in [0, num_timesteps), drawn from `generator` (seeded by the trainer per rank/step)."""
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start, t):
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        posterior_mean = (self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
                          + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t)
        posterior_variance = self._extract("posterior_variance", t, x_t.shape)
        posterior_log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """p(x_{t-1} | x_t): dict with mean, variance, log_variance, pred_xstart, extra."""
        if model_kwargs is None:
            model_kwargs = {}
        B, C = x.shape[:2]
        model_output = model(x, t, **model_kwargs)
        if isinstance(model_output, tuple):
            model_output, extra = model_output
        else:
            extra = None

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (B, C * 2, *x.shape[2:]):
                raise ValueError(f"learned variance needs a (B, 2C, ...) output {(B, C * 2, *x.shape[2:])}, "
                                 f"got {tuple(model_output.shape)}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("log_betas", t, x.shape)
                frac = (model_var_values + 1) / 2  # model output in [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            variance_name, log_variance_name = {
                ModelVarType.FIXED_LARGE: ("fixed_large_variance", "fixed_large_log_variance"),
                ModelVarType.FIXED_SMALL: ("posterior_variance", "posterior_log_variance_clipped"),
            }[self.model_var_type]
            model_variance = self._extract(variance_name, t, x.shape)
            model_log_variance = self._extract(log_variance_name, t, x.shape)

        def process_xstart(value):
            if denoised_fn is not None:
                value = denoised_fn(value)
            return value.clamp(-1, 1) if clip_denoised else value

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        else:
            raise ValueError(f"unsupported model_mean_type {self.model_mean_type!r}")
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart, "extra": extra}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape))

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x) (Sohl-Dickstein et al. 2015)."""
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Score-conditioned eps for DDIM (Song et al. 2020): eps - sqrt(1 - abar) * grad."""
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **(model_kwargs or {}))
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, noise=None):
        """One ancestral step x_t -> x_{t-1}; no noise is added where t == 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if noise is None:
            noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False):
        final = None
        for sample in self.p_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                     denoised_fn=denoised_fn, cond_fn=cond_fn,
                                                     model_kwargs=model_kwargs, device=device, progress=progress):
            final = sample
        return final["sample"]

    def _start(self, shape, noise, device):
        if device is None:
            device = noise.device if noise is not None else "cpu"
        img = noise if noise is not None else torch.randn(*shape, device=device)
        return img, device

    def _indices(self, progress: bool):
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        return indices

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                                  model_kwargs=None, device=None, progress=False) -> Iterator[dict]:
        """Yield each step's {"sample", "pred_xstart"} from t = T-1 down to 0."""
        img, device = self._start(shape, noise, device)
        for i in self._indices(progress):
            t = torch.full((img.shape[0],), i, device=device)  # filled on the device: no copy
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    cond_fn=cond_fn, model_kwargs=model_kwargs)
                yield out
                img = out["sample"]

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0, noise=None):
        """One DDIM step (Song et al. 2020, eq. 12); eta=0 deterministic, eta=1 ancestral-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # eps re-derived from the (clipped) x_0 so that the step is consistent with it
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        if noise is None:
            noise = torch.randn_like(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0):
        """Deterministic DDIM inversion step x_t -> x_{t+1}."""
        if eta != 0.0:
            raise ValueError(f"reverse DDIM is deterministic only (eta=0), got eta={eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = ((self._extract("sqrt_recip_alphas_cumprod", t, x.shape) * x - out["pred_xstart"])
               / self._extract("sqrt_recipm1_alphas_cumprod", t, x.shape))
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0):
        final = None
        for sample in self.ddim_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                        denoised_fn=denoised_fn, cond_fn=cond_fn,
                                                        model_kwargs=model_kwargs, device=device,
                                                        progress=progress, eta=eta):
            final = sample
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta=0.0) -> Iterator[dict]:
        img, device = self._start(shape, noise, device)
        for i in self._indices(progress):
            t = torch.full((img.shape[0],), i, device=device)  # filled on the device: no copy
            with torch.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                       cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta)
                yield out
                img = out["sample"]

    # ------------------------------------------------------------------ losses
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """Per-sample variational-bound term in bits per dim: KL for t > 0, decoder NLL at t == 0."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        output = torch.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample (N,) losses {"loss", "mse", "vb"} at steps t.

        MSE losses: loss = mse + vb with a learned variance (the DiT hybrid loss), else loss = mse and vb is
        zeros. KL losses: loss = vb (bits per dim, rescaled for RESCALED_KL) and mse is zeros.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            terms["vb"] = terms["loss"]
            terms["mse"] = torch.zeros_like(terms["loss"])
            return terms

        model_output = model(x_t, t, **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            if model_output.shape != (B, C * 2, *x_t.shape[2:]):
                raise ValueError(f"learned variance needs a (B, 2C, ...) output {(B, C * 2, *x_t.shape[2:])}, "
                                 f"got {tuple(model_output.shape)}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # the vb term trains the variance only: the mean it sees is detached
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t,
                                             clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        if not model_output.shape == target.shape == x_start.shape:
            raise ValueError(f"model output {tuple(model_output.shape)} does not match target {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        if "vb" in terms:
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
            terms["vb"] = torch.zeros_like(terms["mse"])
        return terms
