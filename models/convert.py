"""Weight conversion between the official DiT layout (ours) and diffusers' DiTTransformer2DModel.

diffusers' port differs in layout only, except for one numeric detail:
  * every block carries its own copy of the timestep/label embedder (norm1.emb); the final layer uses
    block 0's copy. Official -> diffusers copies the single embedder into every block; diffusers ->
    official requires the copies to agree (they do for converted weights; a model fine-tuned in diffusers
    has untied copies and cannot be represented exactly, which is an error unless allow_untied=True).
  * qkv is split into to_q / to_k / to_v; mlp.fc1/fc2 are ff.net.0.proj / ff.net.2; the final layer is
    proj_out_1 (adaLN) and proj_out_2 (linear); pos_embed is a non-persistent buffer there.
  * its timestep features use frequencies exp(-ln(10^4) i / (half - 1)) (downscale_freq_shift=1) where
    the official model uses / half. `align_diffusers_timestep_embedding` sets the shift to 0 so that a
    converted diffusers model computes exactly the official function.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .pos_embed import sincos_2d

_EMBED_PAIRS = [  # official key -> diffusers key inside transformer_blocks.{i}.norm1.emb
    ("t_embedder.mlp.0", "timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "timestep_embedder.linear_2"),
]
_BLOCK_PAIRS = [  # official blocks.{i}.X -> diffusers transformer_blocks.{i}.Y
    ("adaLN_modulation.1", "norm1.linear"),
    ("attn.proj", "attn1.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
]
_TOP_PAIRS = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("final_layer.adaLN_modulation.1", "proj_out_1"),
    ("final_layer.linear", "proj_out_2"),
]


def _config_value(config: Any, key: str) -> Any:
    return config[key] if isinstance(config, Mapping) else getattr(config, key)


def _depth_from_keys(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def diffusers_config(config: Any) -> dict[str, Any]:
    """DiTTransformer2DModel kwargs for a DiT config (a DiT.config dict or any object with those fields)."""
    hidden, heads = _config_value(config, "hidden_size"), _config_value(config, "num_heads")
    in_channels = _config_value(config, "in_channels")
    input_size = _config_value(config, "input_size")
    if not isinstance(input_size, int):
        if input_size[0] != input_size[1]:
            raise ValueError(f"diffusers' DiT supports square inputs only, got input_size {input_size!r}")
        input_size = input_size[0]
    for option, default in (("moe", None), ("qk_norm", None), ("ffn", "gelu"), ("norm", "layernorm"),
                            ("output_conv", 0)):
        value = config.get(option, default) if isinstance(config, Mapping) else getattr(config, option, default)
        if value != default:
            raise ValueError(f"diffusers' DiT has no equivalent of {option}={value!r}")
    base = config.get("pe_base_size") if isinstance(config, Mapping) else getattr(config, "pe_base_size", None)
    if base is not None and (base if isinstance(base, int) else tuple(base)[0]) != input_size:
        # its position table counts token indices at sample_size: equal to the scaled coordinates only at the base size
        raise ValueError(f"diffusers' DiT has no equivalent of position coordinates scaled to a {base}-latent grid "
                         f"(pe_interpolation) at input size {input_size}; export at input size {base}")
    return dict(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=in_channels,
        out_channels=in_channels * 2 if _config_value(config, "learn_sigma") else in_channels,
        num_layers=_config_value(config, "depth"),
        sample_size=input_size,
        patch_size=_config_value(config, "patch_size"),
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=_config_value(config, "num_classes"),
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def official_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Official/our DiT state dict -> DiTTransformer2DModel state dict (load with strict=True)."""
    depth = _config_value(config, "depth")
    found = _depth_from_keys(state_dict, "blocks.")
    if found != depth:
        raise ValueError(f"config depth {depth} does not match the state dict's {found} blocks")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_PAIRS:
        for suffix in ("weight", "bias"):
            out[f"{theirs}.{suffix}"] = state_dict[f"{ours}.{suffix}"]
    for i in range(depth):
        emb = f"transformer_blocks.{i}.norm1.emb"
        for ours, theirs in _EMBED_PAIRS:
            for suffix in ("weight", "bias"):
                out[f"{emb}.{theirs}.{suffix}"] = state_dict[f"{ours}.{suffix}"].clone()
        out[f"{emb}.class_embedder.embedding_table.weight"] = state_dict["y_embedder.embedding_table.weight"].clone()
        for ours, theirs in _BLOCK_PAIRS:
            for suffix in ("weight", "bias"):
                out[f"transformer_blocks.{i}.{theirs}.{suffix}"] = state_dict[f"blocks.{i}.{ours}.{suffix}"]
        for suffix in ("weight", "bias"):
            q, k, v = state_dict[f"blocks.{i}.attn.qkv.{suffix}"].chunk(3, dim=0)
            out[f"transformer_blocks.{i}.attn1.to_q.{suffix}"] = q.clone()
            out[f"transformer_blocks.{i}.attn1.to_k.{suffix}"] = k.clone()
            out[f"transformer_blocks.{i}.attn1.to_v.{suffix}"] = v.clone()
    return out


def diffusers_to_official(
    state_dict: Mapping[str, torch.Tensor], config: Any, allow_untied: bool = False
) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel state dict -> official/our DiT state dict, pos_embed recomputed for the config."""
    depth = _depth_from_keys(state_dict, "transformer_blocks.")
    if depth != _config_value(config, "depth"):
        raise ValueError(f"config depth {_config_value(config, 'depth')} does not match the state dict's {depth} blocks")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_PAIRS:
        for suffix in ("weight", "bias"):
            out[f"{ours}.{suffix}"] = state_dict[f"{theirs}.{suffix}"]
    embedder_keys = [(f"{o}.{s}", f"{t}.{s}") for o, t in _EMBED_PAIRS for s in ("weight", "bias")]
    embedder_keys.append(("y_embedder.embedding_table.weight", "class_embedder.embedding_table.weight"))
    for ours, theirs in embedder_keys:
        first = state_dict[f"transformer_blocks.0.norm1.emb.{theirs}"]
        for i in range(1, depth):
            if not allow_untied and not torch.equal(first, state_dict[f"transformer_blocks.{i}.norm1.emb.{theirs}"]):
                raise ValueError(
                    f"block {i} has its own {theirs} different from block 0's; the official layout has one shared "
                    "embedder (pass allow_untied=True to take block 0's, which the diffusers final layer uses)"
                )
        out[ours] = first
    for i in range(depth):
        for ours, theirs in _BLOCK_PAIRS:
            for suffix in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{suffix}"] = state_dict[f"transformer_blocks.{i}.{theirs}.{suffix}"]
        for suffix in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(
                [state_dict[f"transformer_blocks.{i}.attn1.to_{n}.{suffix}"] for n in "qkv"], dim=0
            )
    input_size = _config_value(config, "input_size")
    grid_h, grid_w = (input_size, input_size) if isinstance(input_size, int) else input_size
    patch = _config_value(config, "patch_size")
    out["pos_embed"] = sincos_2d(_config_value(config, "hidden_size"), grid_h // patch, grid_w // patch).unsqueeze(0)
    return out


def align_diffusers_timestep_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """Make a DiTTransformer2DModel use the official timestep frequencies (divide by half, not half - 1)."""
    for module in model.modules():
        if type(module).__name__ == "Timesteps":
            module.downscale_freq_shift = 0
    return model
