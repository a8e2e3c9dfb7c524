"""DiT models, MoE feed-forward, Gaussian diffusion and rectified-flow objectives (plain PyTorch)."""
from .dit import DiT, DiTBlock, DiT_models, build_dit, create_model
from .diffusion import create_diffusion
from .flow import RectifiedFlow
from .moe import MoEConfig, MoEFeedForward
from .objectives import build_objective

__all__ = [
    "DiT",
    "DiTBlock",
    "DiT_models",
    "build_dit",
    "create_model",
    "create_diffusion",
    "RectifiedFlow",
    "MoEConfig",
    "MoEFeedForward",
    "build_objective",
]
