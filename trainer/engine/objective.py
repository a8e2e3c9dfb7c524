"""The run's training objective (Gaussian diffusion or rectified flow) from the config's ``objective`` section."""
from __future__ import annotations

from trainer.config.schema import RunConfig


def build_objective_from_config(cfg: RunConfig, learn_sigma: bool):
    from models.objectives import build_objective

    o = cfg.objective
    if o.kind == "flow":
        return build_objective("flow", timestep_sampling=o.flow_timesteps, logit_mean=o.flow_logit_mean,
                               logit_std=o.flow_logit_std)
    return build_objective("diffusion", noise_schedule=o.noise_schedule, diffusion_steps=o.diffusion_steps,
                           learn_sigma=learn_sigma)
