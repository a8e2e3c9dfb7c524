"""The DiT as a sequence of pipeline layers: embed → blocks → final layer.

Between layers travels a tuple of tensors (DeepSpeed's pipeline engine sends tuples; floating tensors
get gradients sent back, integer ones do not):
    (tokens (N, T, D), c (N, D) conditioning vector, grid (2,) int64 token-grid height/width)
The first layer takes the micro-batch inputs (x_t (N, C, H, W), t (N,), y (N,), force_drop (N,)), so
timesteps and labels reach the only layer that needs them; c carries them on to every block.
The last layer returns the model output (N, C_out, H, W); the loss is computed on the last stage.

Layers are built from a ``DiTSource`` holding one full, already initialised DiT (the same on every rank),
so each stage takes its slice of the single-process init; ``release()`` drops the full model afterwards.
``pipeline_name_map`` turns a stage's parameter names ("3.block.attn.qkv.weight") back into official ones.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.dit import TokenGridMixin, unpatchify


class DiTSource:
    """Holds the full model until every stage has taken its layers."""

    def __init__(self, model: nn.Module):
        self.model = model

    def release(self) -> None:
        self.model = None


class EmbedLayer(TokenGridMixin, nn.Module):
    """Patch, timestep and label embedders; the token grid and position table work as in the DiT."""

    def __init__(self, source: DiTSource):
        super().__init__()
        dit = source.model
        self.x_embedder, self.t_embedder, self.y_embedder = dit.x_embedder, dit.t_embedder, dit.y_embedder
        self.pos_embed = dit.pos_embed  # fixed sin-cos table (not trained)
        self.patch_size, self.hidden_size = dit.patch_size, dit.hidden_size
        self.grid_size, self.base_grid_size = dit.grid_size, dit.base_grid_size
        self.pe_interpolate, self.pe_interpolation = dit.pe_interpolate, dit.pe_interpolation
        self._pos_embed_cache: dict = {}

    def forward(self, inputs):
        x, t, y, drop = inputs
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.x_embedder(x) + self.pos_embed_for(grid, x.device)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, drop)
        return tokens, c, torch.tensor(grid, dtype=torch.long, device=x.device)


class BlockLayer(nn.Module):
    def __init__(self, source: DiTSource, index: int, grad_checkpoint: bool = False):
        super().__init__()
        self.block = source.model.blocks[index]
        self.grad_checkpoint = grad_checkpoint

    def forward(self, inputs):
        x, c, grid = inputs
        if self.grad_checkpoint and torch.is_grad_enabled():
            x = checkpoint(self.block, x, c, use_reentrant=False)
        else:
            x = self.block(x, c)
        return x, c, grid


class FinalLayer(nn.Module):
    def __init__(self, source: DiTSource):
        super().__init__()
        dit = source.model
        self.final_layer = dit.final_layer
        self.output_conv = dit.output_conv  # None for the reference DiT
        self.patch_size, self.out_channels = dit.patch_size, dit.out_channels

    def forward(self, inputs):
        x, c, grid = inputs
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        x = unpatchify(x, (int(grid[0]), int(grid[1])), self.patch_size, self.out_channels)  # (N, C_out, H, W)
        if self.output_conv is not None:
            x = self.output_conv(x)  # (N, C_out, H, W), residual
        return x.float() if torch.is_autocast_enabled(x.device.type) else x


def dit_layer_specs(source: DiTSource, grad_checkpoint: int = 0) -> list:
    """LayerSpecs embed, depth blocks, final (depth + 2 layers); grad_checkpoint k: every k-th block."""
    from deepspeed.pipe import LayerSpec

    depth = len(source.model.blocks)
    specs = [LayerSpec(EmbedLayer, source)]
    for i in range(depth):
        specs.append(LayerSpec(BlockLayer, source, i, bool(grad_checkpoint) and i % grad_checkpoint == 0))
    specs.append(LayerSpec(FinalLayer, source))
    return specs


def layer_parameter_counts(model: nn.Module) -> list[int]:
    """Trainable parameters per pipeline layer of a full DiT (for partitioning)."""
    def count(m):
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    embed = count(model.x_embedder) + count(model.t_embedder) + count(model.y_embedder)
    final = count(model.final_layer) + (count(model.output_conv) if model.output_conv is not None else 0)
    return [embed] + [count(b) for b in model.blocks] + [final]


def partition_bounds(counts: list[int], stages: int, method: str) -> list[int]:
    """Layer boundaries (stages + 1 numbers) for "parameters" (balanced by weight count, every stage with at
    least one block), "uniform" (blocks spread evenly) or "a,b,c" (blocks per stage)."""
    depth = len(counts) - 2
    if stages > depth:
        raise ValueError(f"{stages} pipeline stages exceed the depth {depth}")
    if method not in ("parameters", "uniform"):
        try:
            sizes = [int(v) for v in method.split(",")]
        except ValueError:
            raise ValueError(f"parallel.pipeline_partition={method!r}: expected parameters, uniform or "
                             f"comma-separated block counts") from None
        if len(sizes) != stages or sum(sizes) != depth or min(sizes) < 1:
            raise ValueError(f"parallel.pipeline_partition={method!r} must list {stages} positive block counts "
                             f"summing to the depth {depth}")
    elif method == "uniform":
        sizes = [depth // stages + (1 if s < depth % stages else 0) for s in range(stages)]
    else:
        # Balanced by weights: contiguous groups of blocks (embed counted with the first block, the final
        # layer with the last) minimising the heaviest stage; exact dynamic programme (depth <= a few dozen).
        w = [b + (counts[0] if i == 0 else 0) + (counts[-1] if i == depth - 1 else 0)
             for i, b in enumerate(counts[1:-1])]
        prefix = [0]
        for v in w:
            prefix.append(prefix[-1] + v)
        inf = float("inf")
        best = [[inf] * (depth + 1) for _ in range(stages + 1)]
        cut = [[0] * (depth + 1) for _ in range(stages + 1)]
        best[0][0] = 0
        for s in range(1, stages + 1):
            for end in range(s, depth + 1):
                for start in range(s - 1, end):
                    cost = max(best[s - 1][start], prefix[end] - prefix[start])
                    if cost < best[s][end]:
                        best[s][end], cut[s][end] = cost, start
        sizes, end = [], depth
        for s in range(stages, 0, -1):
            start = cut[s][end]
            sizes.append(end - start)
            end = start
        sizes.reverse()
    bounds = [0]
    for i, n in enumerate(sizes):
        bounds.append(bounds[-1] + n)
    bounds = [0] + [1 + b for b in bounds[1:]]  # layer 0 is the embedder
    bounds[-1] = depth + 2  # the final layer joins the last stage
    return bounds


_BLOCK = re.compile(r"^(\d+)\.block\.(.*)$")
_OTHER = re.compile(r"^(\d+)\.(.*)$")


def pipeline_name_map(names, depth: int) -> dict:
    """{stage parameter name: official DiT name} for PipelineModule names ("<layer>.<...>")."""
    out = {}
    for n in names:
        m = _BLOCK.match(n)
        if m:
            out[n] = f"blocks.{int(m.group(1)) - 1}.{m.group(2)}"
            continue
        m = _OTHER.match(n)
        if not m:
            raise ValueError(f"unexpected pipeline parameter name {n!r}")
        out[n] = m.group(2)  # "0.x_embedder..." / "<depth+1>.final_layer..."
    return out
