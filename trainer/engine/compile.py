"""``train.compile``: torch.compile each DiT block (torchtitan's per-block scheme), not the whole model.

Why per block: every block has the same code and shapes, so one compiled graph serves all of them and
compile time stays one block's worth; the embedders, the final layer and DeepSpeed's engine stay eager; and
``nn.Module.compile`` compiles in place, so state-dict keys (checkpoints, EMA, export) do not change.
Gradient checkpointing wraps the compiled block and recomputes through it.

Inductor fuses the elementwise work around the matmuls (LayerNorm, adaLN modulation, GELU, gated residuals),
which is where a DiT step spends what its matmuls and attention do not. Layouts whose blocks DeepSpeed or
fairscale rewrite at run time are refused up front (trainer/config/validate.py): ZeRO-3 gathers parameters in
module hooks, tensor/pipeline parallelism swap layers for collective-calling ones, and DeepSpeed-MoE routes
tokens with data-dependent shapes.
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer block of ``model`` in place; returns how many were compiled."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(f"{type(model).__name__} has no `blocks` ModuleList to compile")
    for block in blocks:
        block.compile()
    return len(blocks)


def compile_report() -> dict:
    """Graphs dynamo compiled in this process so far and its graph breaks (a break means unfused, eager code)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
