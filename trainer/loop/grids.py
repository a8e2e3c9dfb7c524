"""The in-training EMA sample grid: every rank gets the EMA model (gathered under ZeRO-3 and model-parallel
layouts, then broadcast), samples its share of the grid's rows, and rank 0 gathers the latents, decodes them with
the shard set's VAE on its own device and writes the PNG.

Why every rank samples: on rank 0 alone the others wait idle for the whole sampling loop; split, each rank
samples 1/world of the rows, after one broadcast of the weights (the demo's final 128 px grid, with its
validation and checkpoint: 33 s after the last step on 2 CPU ranks, 44 s on rank 0 alone). Every rank holds the
plain model while it samples, as rank 0 alone did before (and as the in-training FID does). Sample i starts from
the same noise on any number of ranks (``sampling.sample_latents``), so the grid shows the same samples; its
bytes may differ in the last bits across world sizes (other batch shapes).

The VAE is loaded once per shard set and device for the life of the process (``grid_vae``), not at every grid:
a diffusers VAE is hundreds of MB read from disk and moved to the GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from trainer.engine.distributed import barrier, broadcast_state, host_group

_VAES: dict = {}


def grid_vae(shards, device: torch.device):
    """The shard set's VAE (the one that encoded it) on ``device``, loaded on first use and kept."""
    key = (os.path.abspath(shards.directory), str(torch.device(device)))
    if key not in _VAES:
        from data_pipeline.vae import load_vae_from_manifest

        _VAES[key] = load_vae_from_manifest(shards.directory, device=device)
    return _VAES[key]


def ema_model_on_every_rank(trainer, stage):
    """Collective: (plain DiT from the EMA at the stage's resolution on this rank's device, its arch) on every rank.
    The EMA is gathered to rank 0 (under ZeRO-3 and model-parallel layouts) and broadcast; grids and the
    in-training FID both sample with it."""
    from trainer.state.consolidate import model_from_ema

    arch = trainer.arch.with_input_size(trainer.shard_sets[stage.index].latent_shape[1])
    tensors = broadcast_state(trainer.ema.full_tensors(), trainer.device)
    model = model_from_ema(tensors, arch, trainer.device, source=f"step {trainer.state.step}")
    del tensors
    return model, arch


def gather_rows(indices: list[int], rows: torch.Tensor, total: int) -> Optional[torch.Tensor]:
    """Collective over the host group: rank 0 gets the (total, ...) tensor whose row i came from the rank that
    held index i; the other ranks get None. ``rows``: (len(indices), ...) on any device."""
    mine = (indices, rows.detach().cpu())
    if not dist.is_initialized() or dist.get_world_size() == 1:
        parts = [mine]
    else:
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0, group=host_group())
        if dist.get_rank() != 0:
            return None
    _, sample_rows = next(p for p in parts if len(p[0]))  # a rank that held rows: their shape and dtype
    out = torch.empty((total, *sample_rows.shape[1:]), dtype=sample_rows.dtype)  # (total, ...)
    for part_indices, part_rows in parts:
        if len(part_indices):
            out[part_indices] = part_rows
    return out


def ema_sample_grid(trainer, stage, name: Optional[str] = None) -> Optional[str]:
    """Collective (every rank calls it); rank 0 writes the grid and returns its path, the others return None."""
    from trainer.monitor.sampling import describe_latent_range, latent_range, sample_indices, sample_latents

    shards = trainer.shard_sets[stage.index]
    model, arch = ema_model_on_every_rank(trainer, stage)
    s = trainer.cfg.sample
    classes = list(s.classes) or list(range(arch.num_classes))
    total = len(classes) * s.per_class
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = sample_indices(total, trainer.rank, world)
    latents = torch.empty((0, *shards.latent_shape))  # (0, C, h, w): a rank beyond the grid's size samples nothing
    if mine:
        latents = sample_latents(model, trainer.objective, classes=classes, per_class=s.per_class,
                                 latent_shape=shards.latent_shape, cfg_scale=s.cfg_scale, steps=s.steps,
                                 method=s.method, seed=s.seed, device=trainer.device, num_classes=arch.num_classes,
                                 indices=mine)  # (len(mine), C, h, w)
    del model
    latents = gather_rows(mine, latents, total)  # rank 0: (total, C, h, w) class-major; elsewhere None
    if trainer.rank != 0:
        barrier()
        return None
    from data_pipeline.images import save_image_grid

    path = os.path.join(trainer.run_dir, "samples", name or f"step{trainer.state.step:08d}.png")
    vae = grid_vae(shards, trainer.device)
    images = vae.decode(latents.to(trainer.device))  # (total, 3, H, W) in [-1, 1], decoded on the VAE's device
    save_image_grid(images.cpu(), path, nrow=s.per_class)
    spread = latent_range(latents)
    trainer.metrics.log_image(trainer.state.step, "samples", path, spread)  # events.jsonl; W&B samples/latent_*
    print(f"[trainer] sample grid {path} ({describe_latent_range(spread)})", flush=True)
    barrier()
    return path
