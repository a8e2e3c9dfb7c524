"""AdamW for DiT: parameter groups (no decay on biases, norms, embedding tables) and DeepSpeed's optimizer section."""
from __future__ import annotations

import torch

from trainer.config.schema import RunConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, embeddings tables and other 1-D tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding_table" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def optimizer_config(cfg: RunConfig) -> dict:
    """torch's AdamW (DeepSpeed's `torch_adam`): works on CPU and CUDA without compiling extensions.

    ``fused`` is torch's one-pass kernel. ZeRO steps one flat partition per parameter group, where the
    multi-tensor path allocates partition-sized temporaries (sqrt, division) every step; on CPU those are
    fresh page-faulted memory each time. The fused kernel needs none and reads each value once.
    """
    params = {"lr": cfg.train.lr, "betas": [cfg.train.beta1, cfg.train.beta2], "eps": cfg.train.eps,
              "weight_decay": cfg.train.weight_decay, "torch_adam": True}
    if cfg.train.fused_adamw:
        params["fused"] = True
    return {"type": "AdamW", "params": params}
