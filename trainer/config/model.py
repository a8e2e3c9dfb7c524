"""Run config + shard manifest → the run's ``DiTArgs`` (models/args.py).

``DiTArgs`` is the one record of "which model is this": it builds the model (``DiTArgs.build``), is stored in
every checkpoint, and is compared on resume (a different architecture is refused).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.config.schema import ConfigError, RunConfig

if TYPE_CHECKING:
    from models.args import DiTArgs


def latent_size(resolution: int, downsample: int) -> int:
    if resolution % downsample:
        raise ConfigError(f"resolution {resolution} is not divisible by the VAE downsampling factor {downsample}")
    return resolution // downsample


def architecture(cfg: RunConfig, *, in_channels: int, input_size: int, num_classes: int) -> DiTArgs:
    """The run's ``DiTArgs``: a preset (``model.name: DiT-XL/2``) or ``custom``, with the config's overrides, the
    shard set's latent channels and size, and its class count unless ``model.num_classes`` says otherwise."""
    from models.args import PRESET_NAMES, DiTArgs, preset_kwargs

    m = cfg.model
    if m.name in PRESET_NAMES:
        base = preset_kwargs(m.name)
    elif m.name == "custom":
        missing = [k for k in ("hidden_size", "depth", "num_heads", "patch_size") if getattr(m, k) is None]
        if missing:
            raise ConfigError(f"model.name=custom needs model.{', model.'.join(missing)}")
        base = {}
    else:
        raise ConfigError(f"unknown model.name '{m.name}'; use one of {', '.join(PRESET_NAMES)} or 'custom'")
    pick = {k: getattr(m, k) or base.get(k) for k in ("patch_size", "hidden_size", "depth", "num_heads")}
    if pick["hidden_size"] % pick["num_heads"]:
        raise ConfigError(f"model.hidden_size={pick['hidden_size']} is not divisible by model.num_heads={pick['num_heads']}")
    if input_size % pick["patch_size"]:
        raise ConfigError(f"latent size {input_size} is not divisible by model.patch_size={pick['patch_size']}")
    if m.output_conv not in (0, 1, 2):
        raise ConfigError(f"model.output_conv must be 0 (off), 1 or 2 conv layers, got {m.output_conv!r}")
    moe = None
    if m.moe.num_experts > 0:
        moe = {"num_experts": m.moe.num_experts, "top_k": m.moe.top_k, "every": m.moe.every,
               "capacity_factor": m.moe.capacity_factor, "shared_expert": m.moe.shared_expert,
               "noisy_gate": m.moe.noisy_gate, "aux_loss_coef": m.moe.aux_loss_coef}
    return DiTArgs(input_size=input_size, in_channels=in_channels, mlp_ratio=m.mlp_ratio or 4.0,
                   class_dropout_prob=m.class_dropout_prob, num_classes=m.num_classes or num_classes,
                   learn_sigma=m.learn_sigma, qk_norm=None if m.qk_norm == "none" else m.qk_norm, ffn=m.ffn,
                   norm=m.norm, output_conv=m.output_conv, moe=moe,
                   pe_base_size=input_size if cfg.pe_interpolation else None, **pick)
