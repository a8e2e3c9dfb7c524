"""Layout-aware EMA: each rank's slice under official DiT names, merged back into one state dict.

Model-parallel checkpoints: each rank writes its EMA (``ema_rank*.pt``) and each data-rank-0 rank its
weights (``model_rank*.pt``) under official DiT names with a split spec; ``merge_states`` turns the
files of any layout back into one official state dict (trainer/state/consolidate.py, the export tool).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.state.ema import EMA


class ParallelEMA(EMA):
    """EMA of this rank's slice, saved and gathered under official DiT names.

    ``name_map``: local parameter name -> official name; ``split``: official name -> how tensor ranks
    split it (models/parallel/tensor.py). Every rank saves its own file, so resume needs no collective.
    """

    def __init__(self, module, decay, name_map: dict, split: dict, layout: dict, comm_device="cpu"):
        super().__init__(module, decay, comm_device)
        self.official = [name_map[n] for n in self.names]
        self.split = {n: split[n] for n in self.official if n in split}
        self.layout = layout
        self.sharded = False
        self.last_gather: dict = {}  # what the last full_tensors moved (rank 0: bytes received per sender)

    mismatch_hint = " (was the checkpoint written under another parallel layout?)"

    @property
    def saved_names(self) -> list[str]:
        return self.official

    def local_state(self) -> dict:
        return {**super().local_state(), "layout": self.layout, "split": self.split}

    @torch.no_grad()
    def load_full(self, tensors: dict) -> None:
        """Load a full EMA (official names, any layout's consolidation): this rank's tensors, cut for its tensor rank."""
        from models.parallel.tensor import slice_tensor

        missing = [n for n in self.official if n not in tensors]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        rank, size = self.layout.get("tensor", 0), self.layout.get("tensor_size", 1)
        for n, s in zip(self.official, self.shadow):
            s.copy_(slice_tensor(tensors[n].detach().float(), self.split.get(n), rank, size).view_as(s))

    def full_tensors(self, dst: int = 0) -> dict:
        """Collective: rank ``dst`` gets the merged official state dict (CPU), the others an empty dict."""
        out, self.last_gather = gather_full_state(self.local_state(), dst)
        return out


def fetch_plan(metas: list[dict]) -> list[list[str]]:
    """Per rank, the names it must send so that rank 0 holds every distinct slice exactly once.

    ``metas[r]``: {"layout", "split", "names"} of rank r. A tensor-parallel slice is identified by (name, pipeline
    stage, tensor rank); any other tensor by its name alone (pipeline stages and expert ranks hold disjoint
    official names; data-parallel replicas and tensor ranks hold copies). Each is fetched from the lowest rank
    holding it, so data-parallel replicas send nothing."""
    owner: dict = {}
    for r, m in enumerate(metas):
        lay = m["layout"]
        for n in m["names"]:
            key = (n, lay.get("pipe", 0), lay.get("tensor", 0)) if n in m["split"] else (n,)
            owner.setdefault(key, r)
    plan: list[list[str]] = [[] for _ in metas]
    for key, r in owner.items():
        plan[r].append(key[0])
    return [sorted(names) for names in plan]


def gather_full_state(local: dict, dst: int = 0) -> tuple[dict, dict]:
    """Collective. (rank ``dst``: the merged official state dict on CPU, others {}; what was moved).

    Over NCCL, ``gather_object`` of every rank's whole slice allocates max object size × world on rank 0's GPU
    (≈ 90 GB for DiT-XL/2 TP2 on 64 GPUs). Instead the ranks agree on a plan from their tensor *names* (a few
    KB, over the host gloo group), then each distinct slice is sent once, tensor by tensor, to ``dst``'s host
    memory: rank 0 holds one tensor in flight plus the result, and data-parallel replicas send nothing."""
    from trainer.engine.distributed import host_group

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return merge_states([local]), {"received_bytes": {}}
    rank, group = dist.get_rank(), host_group()
    meta = {"layout": local["layout"], "split": local["split"], "names": sorted(local["tensors"]),
            "shapes": {n: (tuple(t.shape), str(t.dtype).replace("torch.", "")) for n, t in local["tensors"].items()}}
    metas = [None] * world if rank == dst else None
    dist.gather_object(meta, metas, dst=dst, group=group)
    box = [fetch_plan(metas) if rank == dst else None]
    dist.broadcast_object_list(box, src=dst, group=group)
    plan = box[0]
    if rank != dst:
        for name in plan[rank]:  # in plan order, which the receiver follows too
            dist.send(local["tensors"][name].detach().to("cpu", torch.float32).contiguous(), dst=dst, group=group)
        return {}, {"sent": len(plan[rank])}
    parts, received = [], {}
    for r in range(world):
        tensors = {}
        for name in plan[r]:
            if r == rank:
                tensors[name] = local["tensors"][name].detach().to("cpu", torch.float32)
                continue
            shape, _ = metas[r]["shapes"][name]
            buf = torch.empty(shape, dtype=torch.float32)  # (*shape,) fp32, the EMA's dtype
            dist.recv(buf, src=r, group=group)
            received[r] = received.get(r, 0) + buf.numel() * buf.element_size()
            tensors[name] = buf
        if tensors:
            parts.append({"layout": metas[r]["layout"], "split": metas[r]["split"], "tensors": tensors})
    return merge_states(parts), {"received_bytes": received}


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
    device = getattr(par.engine, "device", "cpu")  # where the engine's collectives want tensors
    if not par.model_parallel:
        return EMA(module, decay, device)
    return ParallelEMA(module, decay, par.name_map, par.split, par.layout(), device)
