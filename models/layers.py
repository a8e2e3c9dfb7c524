"""Small building blocks of the DiT: one module, one job, reference attribute names.

The attribute names (proj, qkv, fc1, fc2, mlp.0/2, embedding_table, adaLN_modulation) are the
state-dict contract with facebookresearch/DiT and the hooks a later tensor-parallel step targets,
so none of these modules holds any parallel plumbing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation: x (N, T, D), shift/scale (N, D) -> x * (1 + scale) + shift.

    Under autocast the result feeds a low-precision matmul anyway, so it is computed in the autocast dtype:
    half the memory traffic, and the next linear layer needs no separate cast pass over (N, T, D).
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, shift, scale = x.to(dtype), shift.to(dtype), scale.to(dtype)
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def make_norm(kind: str, dim: int) -> nn.Module:
    """Parameter-free norm used before modulation: affine comes from adaLN, so no weights here."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=NORM_EPS, elementwise_affine=False)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")


class PatchEmbed(nn.Module):
    """Image latent (N, C, H, W) -> tokens (N, T, D) with a stride-p convolution's weights.

    The weight keeps the Conv2d layout (D, C, p, p) for key compatibility, but the product is done as one
    matmul over unfolded patches: on CPU that is faster than a strided convolution and equal in value.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        patches = x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)
        weight = self.proj.weight.reshape(self.proj.out_channels, c * p * p)  # (D, C*p*p)
        return F.linear(patches, weight, self.proj.bias)  # (N, T, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and SDPA.

    qk_norm (None, "rmsnorm" or "layernorm") normalises per-head q and k (over head_dim) before the
    product; it adds `q_norm`/`k_norm` modules only when enabled so the official layout stays exact.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: str | None = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if qk_norm is None:
            self.q_norm = self.k_norm = None
        elif qk_norm == "rmsnorm":
            self.q_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS)
        elif qk_norm == "layernorm":
            self.q_norm = nn.LayerNorm(self.head_dim, eps=NORM_EPS)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=NORM_EPS)
        else:
            raise ValueError(f"unknown qk_norm {qk_norm!r}; expected None, 'rmsnorm' or 'layernorm'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, hd)
        out = out.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj(out)


class Mlp(nn.Module):
    """Two-layer feed-forward with tanh-approximated GELU (the reference's activation)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def swiglu_hidden(dim: int, mlp_ratio: float, multiple_of: int = 8) -> int:
    """2/3 of the GELU MLP width (same parameter count with three matrices), rounded to a multiple of 8."""
    return int(multiple_of * round(2.0 * mlp_ratio * dim / 3.0 / multiple_of))


class SwiGLUMlp(nn.Module):
    """SwiGLU feed-forward: fc2(silu(fc1_gate(x)) * fc1(x)); fc1 and fc1_gate shard column-wise, fc2 row-wise."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1_gate = nn.Linear(dim, hidden)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1_gate(x)) * self.fc1(x))


def make_ffn(kind: str, dim: int, mlp_ratio: float) -> nn.Module:
    if kind == "gelu":
        return Mlp(dim, int(dim * mlp_ratio))
    if kind == "swiglu":
        return SwiGLUMlp(dim, swiglu_hidden(dim, mlp_ratio))
    raise ValueError(f"unknown ffn {kind!r}; expected 'gelu' or 'swiglu'")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps (int or fractional) -> (N, dim) float32 [cos | sin] features.

    Frequencies exp(-ln(max_period) * i / half), i < half, as in the reference (note: diffusers divides by
    half - 1 instead). Always float32, also under autocast, because bf16 cannot resolve t up to 1000.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D) vectors: sinusoidal features through a SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D); row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: randomly (p = dropout_prob), or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        elif torch.is_tensor(force_drop_ids) and force_drop_ids.device == labels.device:
            drop_ids = force_drop_ids == 1  # the trainer's flags, already beside the labels: no copy
        else:
            drop_ids = torch.as_tensor(force_drop_ids, device=labels.device) == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            if not use_dropout:
                raise ValueError("force_drop_ids needs a null class: build the model with class_dropout_prob > 0")
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class OutputConv(nn.Sequential):
    """Residual 3x3 convolutions over the unpatchified output (N, C, H, W), across token borders.

    ``layers`` 1: one linear conv C -> C; 2: conv C -> 4C, SiLU, conv 4C -> C (a 5x5 reach, nonlinear). The last
    conv is zero-initialised, so ``x + block(x)`` starts as the identity and the DiT as the reference one.
    """

    def __init__(self, channels: int, layers: int):
        if layers not in (1, 2) or isinstance(layers, float):
            raise ValueError(f"output_conv must be 0 (off), 1 or 2 conv layers, got {layers!r}")
        if layers == 1:
            convs = [nn.Conv2d(channels, channels, 3, padding=1)]
        else:
            convs = [nn.Conv2d(channels, 4 * channels, 3, padding=1), nn.SiLU(),
                     nn.Conv2d(4 * channels, channels, 3, padding=1)]
        super().__init__(*convs)
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)  # (N, C, H, W)

    def flops(self, pixels: int) -> int:
        return sum(2 * pixels * m.in_channels * m.out_channels * 9 for m in self if isinstance(m, nn.Conv2d))


class FinalLayer(nn.Module):
    """Modulated norm and linear head: (N, T, D) -> (N, T, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))
