"""Layout-aware EMA: each rank's slice under official DiT names, merged back into one state dict.

Model-parallel checkpoints: each rank writes its EMA (``ema_rank*.pt``) and each data-rank-0 rank its
weights (``model_rank*.pt``) under official DiT names with a split spec; ``merge_states`` turns the
files of any layout back into one official state dict (trainer/state/consolidate.py, the export tool).
"""
from __future__ import annotations

import torch.distributed as dist

from trainer.state.ema import EMA


class ParallelEMA(EMA):
    """EMA of this rank's slice, saved and gathered under official DiT names.

    ``name_map``: local parameter name -> official name; ``split``: official name -> how tensor ranks
    split it (models/parallel/tensor.py). Every rank saves its own file, so resume needs no collective.
    """

    def __init__(self, module, decay, name_map: dict, split: dict, layout: dict):
        super().__init__(module, decay)
        self.official = [name_map[n] for n in self.names]
        self.split = {n: split[n] for n in self.official if n in split}
        self.layout = layout
        self.sharded = False

    mismatch_hint = " (was the checkpoint written under another parallel layout?)"

    @property
    def saved_names(self) -> list[str]:
        return self.official

    def local_state(self) -> dict:
        return {**super().local_state(), "layout": self.layout, "split": self.split}

    def full_tensors(self) -> dict:
        """Collective: rank 0 gets the merged official state dict, the others an empty dict."""
        return gather_full_state(self.local_state())


def gather_full_state(local: dict) -> dict:
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    if dist.get_world_size() > 1:
        dist.gather_object({**local, "tensors": {k: v.cpu() for k, v in local["tensors"].items()}}, parts, dst=0)
    else:
        parts = [local]
    return merge_states(parts) if dist.get_rank() == 0 else {}


def merge_states(parts: list[dict]) -> dict:
    """Per-rank {layout, split, tensors} (official names) of one layout -> one full official state dict.

    Replicated tensors (same name on several ranks) are taken once; tensor-parallel slices are merged in
    tensor-rank order; pipeline stages and expert-parallel ranks hold disjoint names.
    """
    from models.parallel.tensor import merge_tensor_slices

    by_name: dict = {}
    how: dict = {}
    for p in parts:
        lay = p.get("layout", {})
        for name, value in p["tensors"].items():
            key = (lay.get("pipe", 0), lay.get("tensor", 0))
            by_name.setdefault(name, {}).setdefault(key, value)  # data-parallel copies: keep the first
            if name in p.get("split", {}):
                how[name] = p["split"][name]
    out = {}
    for name, slices in by_name.items():
        if name in how:
            ordered = [v for (_, tr), v in sorted(slices.items(), key=lambda kv: kv[0][1])]
            out[name] = merge_tensor_slices(ordered, how[name]).clone()
        else:
            out[name] = next(iter(slices.values())).clone()
    return out


def make_ema(par, decay: float) -> EMA:
    """The EMA for an engine built by ``trainer.engine.parallelize.build_engine``: plain (full or ZeRO-3 sharded)
    when every rank holds the whole model, layout-aware when ranks hold different pieces."""
    module = par.engine.module
    if not par.model_parallel:
        return EMA(module, decay)
    return ParallelEMA(module, decay, par.name_map, par.split, par.layout())
