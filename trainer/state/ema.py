"""Exponential moving average of the trainable weights, kept in fp32, ZeRO-3 aware.

Under ZeRO-3 each rank holds only its partition of every parameter (``param.ds_tensor``), so the
EMA is kept sharded the same way: no rank ever materialises the full model to update it. A full
state dict is assembled (collectively) only when sampling, exporting or saving for export.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_numel")


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, comm_device: torch.device | str = "cpu"):
        """``comm_device``: where tensors must be for the engine's collectives (the rank's GPU under NCCL). Under
        ZeRO-3 with parameter offload the shadow follows ``ds_tensor`` into host memory, and NCCL refuses host
        tensors: the gather moves each shard to ``comm_device`` first."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.comm_device = torch.device(comm_device)
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        for name, p in module.named_parameters():
            if p.requires_grad:
                self.names.append(name)
                self.params.append(p)
        self.sharded = any(_is_zero3_param(p) for p in self.params)
        with torch.no_grad():
            self.shadow = [self._local(p).detach().float().clone() for p in self.params]

    @staticmethod
    def _local(p: torch.nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if _is_zero3_param(p) else p.data

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """shadow ← decay · shadow + (1 − decay) · param (facebookresearch/DiT's update_ema).

        Written as one fused multi-tensor lerp (shadow += (1 − decay)(param − shadow)): one pass over the
        weights per step instead of two, which matters at DiT-XL's 675M parameters.
        """
        d = self.decay if decay is None else decay
        if self.shadow:
            torch._foreach_lerp_(self.shadow, [self._local(p).detach().float() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.copy_(self._local(p).detach().float())

    # ---------------------------------------------------------------- persistence
    # Names the EMA tensors are saved under (subclasses save model-parallel slices under official names),
    # and what a mismatch most likely means.
    @property
    def saved_names(self) -> list[str]:
        return self.names

    mismatch_hint = ""

    def local_state(self) -> dict:
        """What this rank must save: the full EMA, or its shard under ZeRO-3."""
        return {"decay": self.decay, "sharded": self.sharded,
                "tensors": {n: s for n, s in zip(self.saved_names, self.shadow)}}

    @torch.no_grad()
    def load_local_state(self, state: dict) -> None:
        tensors = state["tensors"]
        missing = [n for n in self.saved_names if n not in tensors]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}{self.mismatch_hint}")
        for n, s in zip(self.saved_names, self.shadow):
            src = tensors[n]
            if src.shape != s.shape:
                raise ValueError(f"EMA tensor '{n}' has shape {tuple(src.shape)}, this rank expects "
                                 f"{tuple(s.shape)}{self.mismatch_hint}")
            s.copy_(src)

    @torch.no_grad()
    def full_tensors(self, dst: int = 0) -> dict:
        """name → full fp32 tensor on CPU, on rank ``dst`` only; the other ranks get {} (under ZeRO-3 they take
        part in the gathers, one parameter at a time, and keep nothing). Collective under ZeRO-3."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        out = {}
        for n, s, p in zip(self.names, self.shadow, self.params):
            if _is_zero3_param(p):
                group = getattr(p, "ds_process_group", None)
                world = dist.get_world_size(group=group)
                shard = s.to(self.comm_device).contiguous()  # (ceil(numel / world),) on the collective's device
                parts = [torch.empty_like(shard) for _ in range(world)]
                dist.all_gather(parts, shard, group=group)
                if rank == dst:
                    out[n] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
            elif rank == dst:
                out[n] = s.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_full(self, tensors: dict) -> None:
        """Load a full EMA (official names, any layout's consolidation) into this rank's shadow: the whole tensor, or
        under ZeRO-3 this rank's partition of it (the same cut as ``param.ds_tensor``: rank r holds elements
        [r·s, (r+1)·s) of the flattened tensor, s = the partition size, zero-padded at the end)."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for n, s, p in zip(self.names, self.shadow, self.params):
            full = tensors[n].detach().float().reshape(-1)
            if _is_zero3_param(p):
                r = dist.get_rank(group=getattr(p, "ds_process_group", None))
                piece = full[r * s.numel():(r + 1) * s.numel()]
                s.zero_()
                s.view(-1)[:piece.numel()].copy_(piece)
            else:
                s.copy_(full.view_as(s))
