"""Megatron-style tensor parallelism of the DiT on fairscale's column/row-parallel linears.

Per block, with tensor size P (heads and hidden divisible by P):
  attn.qkv   column-parallel by heads: rank r holds the rows of q, k and v that belong to its heads
             (the fused weight is laid out [q; k; v], each heads·head_dim rows, so a plain contiguous
             split would hand rank 0 all of q and half of k: wrong);
  attn.proj  row-parallel (input = this rank's heads), bias replicated;
  mlp.fc1 (and fc1_gate for SwiGLU) column-parallel, mlp.fc2 row-parallel;
  adaLN_modulation.1 (6·D outputs) column-parallel with the output gathered, so every rank sees the
             full shift/scale/gate vectors (it is a third of a block's weights, so replicating it
             would leave TP=2 at ~67 % of the single-process size);
  final_layer.adaLN_modulation.1 likewise; embedders and the final linear are small and replicated.
Activations entering a column-parallel layer are replicated across the tensor group and its backward
all-reduces their gradient, so replicated parameters get identical gradients on every tensor rank.

``split_spec`` records, per official parameter name, how it was split ("qkv", 0 = rows, 1 = columns,
absent = replicated); ``merge_tensor_slices`` inverts it for export.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QKV = "qkv"


def _fs():
    from fairscale.nn.model_parallel import layers

    return layers


def _noop_init(weight: torch.Tensor) -> torch.Tensor:
    return weight


def slice_rows(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return full.chunk(size, dim=0)[rank]


def slice_qkv(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """(3·D, ...) laid out [q; k; v] -> this rank's heads of q, k and v, again as [q_r; k_r; v_r]."""
    q, k, v = full.chunk(3, dim=0)
    return torch.cat([q.chunk(size, dim=0)[rank], k.chunk(size, dim=0)[rank], v.chunk(size, dim=0)[rank]], dim=0)


def _mark(p: nn.Parameter) -> None:
    p.model_parallel = True  # DeepSpeed counts it on every tensor rank in the global gradient norm
    p.tensor_model_parallel = True


def column_from(linear: nn.Linear, rank: int, size: int, *, gather_output: bool, qkv: bool = False) -> nn.Module:
    cls = _fs().ColumnParallelLinear
    layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, gather_output=gather_output,
                init_method=_noop_init)
    cut = slice_qkv if qkv else slice_rows
    with torch.no_grad():
        layer.weight.copy_(cut(linear.weight.data, rank, size))
        if linear.bias is not None:
            layer.bias.copy_(cut(linear.bias.data, rank, size))
    for p in layer.parameters():
        _mark(p)
    return layer


def row_from(linear: nn.Linear, rank: int, size: int) -> nn.Module:
    cls = _fs().RowParallelLinear
    layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, input_is_parallel=True,
                init_method=_noop_init)
    with torch.no_grad():
        layer.weight.copy_(linear.weight.data.chunk(size, dim=1)[rank])
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.data)  # added once, after the all-reduce: replicated
    _mark(layer.weight)
    return layer


class TensorParallelAttention(nn.Module):
    """The plain Attention with this rank's heads: (N, T, D) -> (N, T, D), one all-reduce in proj."""

    def __init__(self, attn: nn.Module, rank: int, size: int):
        super().__init__()
        if attn.num_heads % size:
            raise ValueError(f"num_heads {attn.num_heads} is not divisible by the tensor-parallel size {size}")
        self.num_heads = attn.num_heads // size  # local heads
        self.head_dim = attn.head_dim
        self.qkv = column_from(attn.qkv, rank, size, gather_output=False, qkv=True)
        self.proj = row_from(attn.proj, rank, size)
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm  # per head_dim: replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H/P, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H/P, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim)  # (N, T, D/P)
        return self.proj(out)  # (N, T, D), all-reduced


class TensorParallelMlp(nn.Module):
    """GELU MLP or SwiGLU with the hidden dimension split: fc1 (and fc1_gate) column, fc2 row."""

    def __init__(self, mlp: nn.Module, rank: int, size: int):
        super().__init__()
        hidden = mlp.fc1.out_features
        if hidden % size:
            raise ValueError(f"MLP hidden size {hidden} is not divisible by the tensor-parallel size {size}")
        self.swiglu = hasattr(mlp, "fc1_gate")
        if self.swiglu:
            self.fc1_gate = column_from(mlp.fc1_gate, rank, size, gather_output=False)
        self.fc1 = column_from(mlp.fc1, rank, size, gather_output=False)
        self.fc2 = row_from(mlp.fc2, rank, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.fc2(F.silu(self.fc1_gate(x)) * self.fc1(x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def tensor_parallelize(model: nn.Module, rank: int, size: int) -> dict:
    """Swap the DiT's blocks and final-layer modulation for tensor-parallel ones, in place.

    fairscale's model-parallel group must already be set (trainer/engine/parallelize.py does it). Returns the
    split spec {official name: "qkv" | 0 | 1} of every sliced parameter.
    """
    if size == 1:
        return {}
    from models.moe import MoEFeedForward

    spec: dict = {}
    for i, block in enumerate(model.blocks):
        if isinstance(block.mlp, MoEFeedForward):
            raise ValueError("tensor parallelism of MoE blocks is not supported; use parallel.tensor=1 with MoE")
        p = f"blocks.{i}."
        block.attn = TensorParallelAttention(block.attn, rank, size)
        spec.update({p + "attn.qkv.weight": QKV, p + "attn.qkv.bias": QKV, p + "attn.proj.weight": 1})
        swiglu = hasattr(block.mlp, "fc1_gate")
        block.mlp = TensorParallelMlp(block.mlp, rank, size)
        for name in (["fc1_gate"] if swiglu else []) + ["fc1"]:
            spec.update({p + f"mlp.{name}.weight": 0, p + f"mlp.{name}.bias": 0})
        spec[p + "mlp.fc2.weight"] = 1
        block.adaLN_modulation[-1] = column_from(block.adaLN_modulation[-1], rank, size, gather_output=True)
        spec.update({p + "adaLN_modulation.1.weight": 0, p + "adaLN_modulation.1.bias": 0})
    fl = model.final_layer
    fl.adaLN_modulation[-1] = column_from(fl.adaLN_modulation[-1], rank, size, gather_output=True)
    spec.update({"final_layer.adaLN_modulation.1.weight": 0, "final_layer.adaLN_modulation.1.bias": 0})
    return spec


def slice_tensor(full: torch.Tensor, how, rank: int, size: int) -> torch.Tensor:
    """This tensor rank's slice of an official (full) tensor split as ``how`` ("qkv", 0 or 1; None: replicated).

    The cut ``tensor_parallelize`` makes, for loading a checkpoint written under another tensor-parallel size."""
    if how is None or size == 1:
        return full
    if how == QKV:
        return slice_qkv(full, rank, size)
    return full.chunk(size, dim=int(how))[rank]


def merge_tensor_slices(slices: list[torch.Tensor], how) -> torch.Tensor:
    """Inverse of the split: slices in tensor-rank order -> the full tensor."""
    if how is None:
        return slices[0]
    if how == QKV:
        parts = [s.chunk(3, dim=0) for s in slices]  # per rank (q_r, k_r, v_r)
        return torch.cat([torch.cat([p[j] for p in parts], dim=0) for j in range(3)], dim=0)
    return torch.cat(slices, dim=int(how))
