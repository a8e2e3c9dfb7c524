"""Run config + shard manifest → the DiT architecture dict and the model.

The architecture dict is the one record of "which model is this": it builds the model, is stored
in every checkpoint, and is compared on resume (a different architecture is refused).
"""
from __future__ import annotations

from trainer.config import ConfigError, RunConfig


def latent_size(resolution: int, downsample: int) -> int:
    if resolution % downsample:
        raise ConfigError(f"resolution {resolution} is not divisible by the VAE downsampling factor {downsample}")
    return resolution // downsample


def architecture(cfg: RunConfig, *, in_channels: int, input_size: int, num_classes: int) -> dict:
    from models.dit import DiT_models, preset_kwargs

    m = cfg.model
    if m.name in DiT_models:
        preset = preset_kwargs(m.name)
        depth, hidden, heads, patch = preset["depth"], preset["hidden_size"], preset["num_heads"], preset["patch_size"]
        mlp_ratio = 4.0
    elif m.name == "custom":
        missing = [k for k in ("hidden_size", "depth", "num_heads", "patch_size") if getattr(m, k) is None]
        if missing:
            raise ConfigError(f"model.name=custom needs model.{', model.'.join(missing)}")
        depth, hidden, heads, patch, mlp_ratio = m.depth, m.hidden_size, m.num_heads, m.patch_size, 4.0
    else:
        raise ConfigError(f"unknown model.name '{m.name}'; use one of {', '.join(DiT_models)} or 'custom'")
    arch = {
        "input_size": input_size,
        "patch_size": m.patch_size or patch,
        "in_channels": in_channels,
        "hidden_size": m.hidden_size or hidden,
        "depth": m.depth or depth,
        "num_heads": m.num_heads or heads,
        "mlp_ratio": m.mlp_ratio or mlp_ratio,
        "class_dropout_prob": m.class_dropout_prob,
        "num_classes": m.num_classes or num_classes,
        "learn_sigma": m.learn_sigma,
        "qk_norm": None if m.qk_norm == "none" else m.qk_norm,
        "ffn": m.ffn,
        "norm": m.norm,
    }
    if arch["hidden_size"] % arch["num_heads"]:
        raise ConfigError(f"model.hidden_size={arch['hidden_size']} is not divisible by model.num_heads={arch['num_heads']}")
    if input_size % arch["patch_size"]:
        raise ConfigError(f"latent size {input_size} is not divisible by model.patch_size={arch['patch_size']}")
    if m.moe.num_experts > 0:
        arch["moe"] = {
            "num_experts": m.moe.num_experts,
            "top_k": m.moe.top_k,
            "every": m.moe.every,
            "capacity_factor": m.moe.capacity_factor,
            "shared_expert": m.moe.shared_expert,
            "noisy_gate": m.moe.noisy_gate,
            "aux_loss_coef": m.moe.aux_loss_coef,
        }
    return arch


def build_model(arch: dict, grad_checkpoint: int = 0):
    from models.dit import DiT

    return DiT(**arch, grad_checkpoint=grad_checkpoint)


def build_objective_from_config(cfg: RunConfig, learn_sigma: bool):
    from models.objectives import build_objective

    o = cfg.objective
    if o.kind == "flow":
        return build_objective("flow", timestep_sampling=o.flow_timesteps, logit_mean=o.flow_logit_mean,
                               logit_std=o.flow_logit_std)
    return build_objective("diffusion", noise_schedule=o.noise_schedule, diffusion_steps=o.diffusion_steps,
                           learn_sigma=learn_sigma)
