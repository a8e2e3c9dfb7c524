"""The in-training EMA sample grid: gather the EMA (collective under ZeRO-3 and model-parallel layouts), rank 0
rebuilds a plain DiT at the stage's resolution, samples it and decodes with the shard set's VAE on its own device.

The VAE is loaded once per shard set and device for the life of the process (``grid_vae``), not at every grid:
a diffusers VAE is hundreds of MB read from disk and moved to the GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from trainer.engine.distributed import barrier

_VAES: dict = {}


def grid_vae(shards, device: torch.device):
    """The shard set's VAE (the one that encoded it) on ``device``, loaded on first use and kept."""
    key = (os.path.abspath(shards.directory), str(torch.device(device)))
    if key not in _VAES:
        from data_pipeline.vae import load_vae_from_manifest

        _VAES[key] = load_vae_from_manifest(shards.directory, device=device)
    return _VAES[key]


def ema_sample_grid(trainer, stage, name: Optional[str] = None) -> Optional[str]:
    tensors = trainer.ema.full_tensors()  # rank 0 only; the others take part in the gather and get {}
    if trainer.rank != 0:
        barrier()
        return None
    shards = trainer.shard_sets[stage.index]
    arch = trainer.arch.with_input_size(shards.latent_shape[1])
    from trainer.monitor.sampling import describe_latent_range, sample_grid
    from trainer.state.consolidate import model_from_ema

    model = model_from_ema(tensors, arch, trainer.device, source=f"step {trainer.state.step}")
    del tensors
    classes = list(trainer.cfg.sample.classes) or list(range(arch.num_classes))
    path = os.path.join(trainer.run_dir, "samples", name or f"step{trainer.state.step:08d}.png")
    s = trainer.cfg.sample
    _, spread = sample_grid(model, trainer.objective, grid_vae(shards, trainer.device), path, classes=classes,
                            per_class=s.per_class, latent_shape=shards.latent_shape, cfg_scale=s.cfg_scale,
                            steps=s.steps, method=s.method, seed=s.seed, device=trainer.device,
                            num_classes=arch.num_classes)
    trainer.metrics.log_image(trainer.state.step, "samples", path, spread)  # events.jsonl; W&B samples/latent_*
    print(f"[trainer] sample grid {path} ({describe_latent_range(spread)})", flush=True)
    barrier()
    return path
