"""Memory accounting of a built DeepSpeed engine, for the memory benchmarks (the trainer does not use it)."""
from __future__ import annotations

import torch


def state_bytes(engine) -> dict:
    """This rank's bytes of parameters (module) and optimizer state (incl. ZeRO's fp32 partitions)."""
    seen = set()
    params = 0
    param_storages = set()
    for p in engine.module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel() * p.element_size()
            param_storages.add(p.untyped_storage().data_ptr())
    opt = 0
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.numel() > 1:
                opt += v.numel() * v.element_size()
    # ZeRO-1/2's fp32 master partitions: extra memory only where they are not aliased to the parameters
    # (trainer/engine/zero_master.py aliases them in fp32 / bf16-autocast runs)
    for flat in getattr(optimizer, "single_partition_of_fp32_groups", None) or []:
        if torch.is_tensor(flat) and flat.untyped_storage().data_ptr() not in param_storages:
            opt += flat.numel() * flat.element_size()
    return {"param_bytes": params, "optim_bytes": opt, "total_bytes": params + opt}
