"""Model FLOPs of a DiT, counted from its modules (2 FLOPs per multiply-add).

Per sample forward, with T tokens, hidden D, per-token linears counted as 2 * in * out * T:
  patch embed   2 * T * (C p^2) * D
  per block     qkv 2*T*D*3D + proj 2*T*D*D + FFN (fc1, fc2 [, fc1_gate]) + attention 4*T^2*D
                (QK^T and AV: 2*T*T*D each) + adaLN 2*D*6D (once per sample, not per token)
  final layer   2 * T * D * (p^2 C_out) + adaLN 2*D*2D
  t embedder    2 * (256*D + D*D)
  MoE FFN       router 2*T*D*E + top_k routed experts per token (+ the shared expert), i.e. active FLOPs;
                capacity drops are ignored (the nominal cost).
Norms, activations, softmax and the residual adds are not counted (the DiT paper's convention).
Train = 3 x forward (backward costs two matmuls per forward matmul). DiT-S/2 at latent 32 gives
12.1 GFLOP forward (paper: 6.06 GMACs), DiT-XL/2 237 GFLOP (118.6 GMACs).
"""
from __future__ import annotations

from torch import nn


def _linear_flops(module: nn.Linear, tokens: int) -> int:
    return 2 * module.in_features * module.out_features * tokens


def _ffn_flops(ffn: nn.Module, tokens: int) -> int:
    return sum(_linear_flops(m, tokens) for m in ffn.modules() if isinstance(m, nn.Linear))


def _block_ffn_flops(mlp: nn.Module, tokens: int) -> int:
    from .moe import MoEFeedForward

    if isinstance(mlp, MoEFeedForward):
        flops = _linear_flops(mlp.router.gate, tokens)
        flops += mlp.config.top_k * _ffn_flops(mlp.experts[0], tokens)
        if mlp.shared_expert is not None:
            flops += _ffn_flops(mlp.shared_expert, tokens)
        return flops
    return _ffn_flops(mlp, tokens)


def dit_forward_flops(model: nn.Module, grid: tuple[int, int] | None = None) -> int:
    """Forward FLOPs of one sample on a token grid (default: the model's current grid)."""
    grid_h, grid_w = model.grid_size if grid is None else grid
    tokens = grid_h * grid_w
    hidden = model.hidden_size
    proj = model.x_embedder.proj
    flops = 2 * tokens * proj.in_channels * model.patch_size**2 * proj.out_channels
    flops += _ffn_flops(model.t_embedder.mlp, 1)
    for block in model.blocks:
        flops += _linear_flops(block.attn.qkv, tokens) + _linear_flops(block.attn.proj, tokens)
        flops += 4 * tokens * tokens * hidden
        flops += _block_ffn_flops(block.mlp, tokens)
        flops += _linear_flops(block.adaLN_modulation[-1], 1)
    flops += _linear_flops(model.final_layer.linear, tokens)
    flops += _linear_flops(model.final_layer.adaLN_modulation[-1], 1)
    conv = getattr(model, "output_conv", None)
    if conv is not None:  # 3x3 convs over the (p*grid_h) x (p*grid_w) output
        flops += conv.flops(tokens * model.patch_size**2)
    return flops
