"""DiT models, MoE feed-forward, Gaussian diffusion and rectified-flow objectives (plain PyTorch)."""
from .args import DiTArgs, preset_kwargs
from .dit import DiT, DiTBlock, DiT_models
from .diffusion import create_diffusion
from .flow import RectifiedFlow
from .moe import MoEConfig, MoEFeedForward
from .objectives import build_objective

__all__ = [
    "DiT",
    "DiTArgs",
    "DiTBlock",
    "DiT_models",
    "preset_kwargs",
    "create_diffusion",
    "RectifiedFlow",
    "MoEConfig",
    "MoEFeedForward",
    "build_objective",
]
