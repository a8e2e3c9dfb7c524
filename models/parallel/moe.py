"""DeepSpeed-MoE feed-forward with the interface and weights of models/moe.py's MoEFeedForward.

``DeepSpeedMoEFeedForward`` wraps ``deepspeed.moe.layer.MoE`` (expert parallelism over ``ep_size`` ranks,
all-to-all token dispatch) and returns the same 3-tuple (output, balance loss, per-expert counts), so
the DiT block does not change. It is built from a plain ``MoEFeedForward`` of the full, seeded model:
the router and this rank's experts (global experts ep_rank·E/ep ... ) are copied, so EP=1 and EP=2 runs
start from identical weights.

Routing is DeepSpeed's (top-1 / top-2 gating, capacity = ceil(capacity_factor · top_k · S / E),
``capacity_factor <= 0`` = no dropping). Deterministic by default: no random token selection and no
sampled second expert; ``noisy_gate`` selects DeepSpeed's RSample policy (top-1) or the Gumbel-sampled
second expert (top-2). Without drops the maths equals MoEFeedForward's (chosen probabilities, renormalised
for top-2); what differs is which tokens are dropped when an expert overflows, and DeepSpeed's top-2
balance loss counts first choices only.

Names map to MoEFeedForward's: ``moe.deepspeed_moe.gate.wg.weight`` -> ``router.gate.weight``,
``moe.deepspeed_moe.experts.deepspeed_experts.<i>.`` -> ``experts.<ep_rank·local + i>.``,
``shared_expert.`` unchanged.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn


class DeepSpeedMoEFeedForward(nn.Module):
    def __init__(self, plain: nn.Module, ep_size: int, ep_rank: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        cfg = plain.config
        if cfg.top_k not in (1, 2):
            raise ValueError(f"DeepSpeed MoE supports top_k 1 or 2, got {cfg.top_k}")
        if cfg.num_experts % ep_size:
            raise ValueError(f"num_experts {cfg.num_experts} is not divisible by the expert-parallel size {ep_size}")
        self.config = cfg
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.num_local = cfg.num_experts // ep_size
        dim = plain.router.gate.in_features
        drop = cfg.capacity_factor > 0
        self.moe = MoE(dim, copy.deepcopy(plain.experts[0]), num_experts=cfg.num_experts, ep_size=ep_size, k=cfg.top_k,
                       capacity_factor=cfg.capacity_factor if drop else 1.0,
                       eval_capacity_factor=cfg.capacity_factor if drop else 1.0, min_capacity=1,
                       noisy_gate_policy="RSample" if cfg.noisy_gate and cfg.top_k == 1 else None,
                       drop_tokens=drop, use_rts=False, top2_2nd_expert_sampling=bool(cfg.noisy_gate))
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.copy_(plain.router.gate.weight)
            for i, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                src = plain.experts[ep_rank * self.num_local + i]
                for (n, p), (n2, q) in zip(expert.named_parameters(), src.named_parameters()):
                    assert n == n2
                    p.copy_(q)
        self.shared_expert = plain.shared_expert
        self.last_dropped_fraction = torch.zeros(())

    def forward(self, x: torch.Tensor):
        n, t, d = x.shape
        out, aux, counts = self.moe(x)
        # counts: routing choices per expert before the capacity cut
        self.last_dropped_fraction = _dropped_fraction(self.moe, counts, n * t, self.config)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x).to(out.dtype)
        return out, aux, counts


def _dropped_fraction(moe, counts: torch.Tensor, tokens: int, cfg) -> torch.Tensor:
    """Share of routing choices beyond capacity: sum_e max(0, count_e - capacity) / (tokens · top_k)."""
    if cfg.capacity_factor <= 0:
        return torch.zeros(())
    import math

    cap = max(1, math.ceil(tokens / cfg.num_experts * cfg.capacity_factor * cfg.top_k))
    over = (counts.float() - cap).clamp_min(0).sum()
    return (over / (tokens * cfg.top_k)).detach()


_GATE = re.compile(r"^(.*)moe\.deepspeed_moe\.gate\.wg\.weight$")
_EXPERT = re.compile(r"^(.*)moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.*)$")


def moe_name_map(names, num_local: int, ep_rank: int) -> dict:
    """{DeepSpeed-MoE parameter name: MoEFeedForward name with the global expert index}; others unchanged."""
    out = {}
    for n in names:
        m = _GATE.match(n)
        if m:
            out[n] = f"{m.group(1)}router.gate.weight"
            continue
        m = _EXPERT.match(n)
        if m:
            out[n] = f"{m.group(1)}experts.{ep_rank * num_local + int(m.group(2))}.{m.group(3)}"
            continue
        out[n] = n
    return out


def use_deepspeed_moe(model: nn.Module, ep_size: int, ep_rank: int) -> int:
    """Replace every MoEFeedForward of a DiT by the DeepSpeed layer (in place); returns how many."""
    from models.moe import MoEFeedForward

    count = 0
    for block in model.blocks:
        if isinstance(block.mlp, MoEFeedForward):
            block.mlp = DeepSpeedMoEFeedForward(block.mlp, ep_size, ep_rank)
            count += 1
    return count
