"""Mixture-of-experts feed-forward: a single-process top-k router over a list of expert MLPs.

It plays the role of `deepspeed.moe.layer.MoE` (tokens (N, T, D) -> (N, T, D), plus the load-balancing
loss and per-expert token counts, returned as a 3-tuple exactly like DeepSpeed's layer), so a placement
step can swap in DeepSpeed's expert-parallel layer without touching the DiT block.

Routing (GShard/Switch style), on tokens flattened to (S = N*T, D):
  probs = softmax(router(x)) in float32; each token picks its top_k experts (on noisy logits when
  noisy_gate and training); combine weights are the chosen probs, renormalised to sum 1 when top_k > 1.
  Capacity per expert = ceil(capacity_factor * S * top_k / E); first choices claim slots before second
  choices, in token order; assignments beyond capacity are dropped (the token gets nothing from that
  expert; with the DiT residual it passes through). capacity_factor <= 0 disables dropping.
  Balance loss = E * sum_e f_e * P_e, f_e = share of all S*top_k choices (before dropping) that went to e,
  P_e = mean router prob of e. Perfectly balanced routing gives 1.0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import make_ffn


@dataclasses.dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    every: int = 1  # MoE replaces the FFN of every `every`-th block (blocks every-1, 2*every-1, ...)
    capacity_factor: float = 1.25  # <= 0: no capacity limit, no drops
    shared_expert: bool = False  # one always-on expert added to the routed output (DeepSeek/DiT-MoE)
    noisy_gate: bool = False  # Gumbel noise on the logits used for expert choice, training only
    aux_loss_coef: float = 0.01  # weight of the balance loss in model.moe_aux_loss()
    normalize_top_k: bool = True  # renormalise the chosen probabilities to sum 1 when top_k > 1

    def __post_init__(self):
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"moe num_experts must be a positive int, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe top_k must be an int in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"moe every must be a positive int, got {self.every!r}")
        if not isinstance(self.capacity_factor, (int, float)) or math.isnan(self.capacity_factor):
            raise ValueError(f"moe capacity_factor must be a number, got {self.capacity_factor!r}")
        if not isinstance(self.aux_loss_coef, (int, float)) or self.aux_loss_coef < 0:
            raise ValueError(f"moe aux_loss_coef must be a non-negative number, got {self.aux_loss_coef!r}")

    @classmethod
    def from_any(cls, moe: Any) -> "MoEConfig | None":
        """None, a MoEConfig, a dict or any dataclass with these field names -> MoEConfig (or None)."""
        if moe is None or moe is False:
            return None
        if isinstance(moe, cls):
            return moe
        if dataclasses.is_dataclass(moe):
            moe = dataclasses.asdict(moe)
        if not isinstance(moe, dict):
            raise ValueError(f"moe must be None, a dict or a MoEConfig, got {type(moe).__name__}: {moe!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(moe) - known)
        if unknown:
            raise ValueError(f"unknown moe keys {unknown}; known keys: {sorted(known)}")
        return cls(**moe)


def balance_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_e f_e * P_e for probs (S, E) and chosen experts (S, k); differentiable through probs."""
    choice_share = torch.bincount(expert_index.reshape(-1), minlength=num_experts).to(probs.dtype)
    choice_share = choice_share / expert_index.numel()  # f_e, sums to 1
    mean_prob = probs.mean(dim=0)  # P_e
    return num_experts * torch.sum(choice_share * mean_prob)


def capacity_keep_mask(expert_index: torch.Tensor, num_experts: int, capacity: int | None) -> torch.Tensor:
    """(S, k) bool: which choices fit in their expert's capacity; choice j of all tokens before choice j+1."""
    if capacity is None:
        return torch.ones_like(expert_index, dtype=torch.bool)
    keep = torch.empty_like(expert_index, dtype=torch.bool)
    used = torch.zeros(num_experts, dtype=torch.long, device=expert_index.device)
    for j in range(expert_index.shape[1]):
        one_hot = F.one_hot(expert_index[:, j], num_experts)  # (S, E)
        slot = (torch.cumsum(one_hot, dim=0) - 1 + used) * one_hot  # (S, E) slot index at the chosen expert
        keep[:, j] = slot.sum(dim=1) < capacity
        used = used + one_hot.sum(dim=0)
    return keep


class TopKRouter(nn.Module):
    """Linear router: tokens (S, D) -> probs (S, E) float32, chosen experts (S, k), combine weights (S, k)."""

    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(dim, config.num_experts, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.gate(tokens).float()  # (S, E)
        probs = logits.softmax(dim=-1)
        choice_logits = logits
        if self.config.noisy_gate and self.training:
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)).clamp_min(1e-20))
            choice_logits = logits + gumbel
        expert_index = choice_logits.topk(self.config.top_k, dim=-1).indices  # (S, k)
        weights = probs.gather(1, expert_index)  # (S, k)
        if self.config.top_k > 1 and self.config.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, expert_index, weights


class MoEFeedForward(nn.Module):
    """Top-k routed expert FFNs (+ optional shared expert): (N, T, D) -> ((N, T, D), balance loss, counts)."""

    def __init__(self, dim: int, mlp_ratio: float, config: MoEConfig, ffn: str = "gelu"):
        super().__init__()
        self.config = config
        self.router = TopKRouter(dim, config)
        self.experts = nn.ModuleList([make_ffn(ffn, dim, mlp_ratio) for _ in range(config.num_experts)])
        self.shared_expert = make_ffn(ffn, dim, mlp_ratio) if config.shared_expert else None
        self.last_dropped_fraction = torch.zeros(())

    def capacity(self, num_tokens: int) -> int | None:
        if self.config.capacity_factor <= 0:
            return None
        return max(1, math.ceil(self.config.capacity_factor * num_tokens * self.config.top_k / self.config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, t, d = x.shape
        tokens = x.reshape(n * t, d)  # (S, D)
        probs, expert_index, weights = self.router(tokens)
        aux = balance_loss(probs, expert_index, self.config.num_experts)
        keep = capacity_keep_mask(expert_index, self.config.num_experts, self.capacity(n * t))  # (S, k)

        out = torch.zeros_like(tokens)
        counts = torch.zeros(self.config.num_experts, dtype=torch.long, device=x.device)
        for e, expert in enumerate(self.experts):
            token_ids, choice_ids = torch.nonzero((expert_index == e) & keep, as_tuple=True)
            counts[e] = token_ids.numel()
            if token_ids.numel() == 0:
                continue
            expert_out = expert(tokens.index_select(0, token_ids))  # (S_e, D)
            gate = weights[token_ids, choice_ids].unsqueeze(1).to(expert_out.dtype)  # (S_e, 1)
            out = out.index_add(0, token_ids, (expert_out * gate).to(out.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens).to(out.dtype)
        self.last_dropped_fraction = 1.0 - keep.float().mean()  # tensor: no host sync in the step
        return out.reshape(n, t, d), aux, counts
