"""The loop's data hook-up: the latent stream of a stage's shard set, and the VAE that decodes its samples."""
from __future__ import annotations

from trainer.config.shards import ShardSet


def make_loader(shards: ShardSet, *, batch_size: int, dp_rank: int, dp_size: int, seed: int, num_workers: int,
                shuffle_buffer: int, resampled: bool, start_batch: int, pin_memory: bool = False):
    """``pin_memory`` (CUDA runs): worker batches are pinned in the DataLoader's thread, so the trainer's
    ``non_blocking`` host-to-device copy really overlaps the step instead of staging through pageable memory."""
    from data_pipeline.loader import LatentLoader

    return LatentLoader(shards.directory, batch_size=batch_size, rank=dp_rank, world_size=dp_size, seed=seed,
                        num_workers=num_workers, shuffle_buffer=shuffle_buffer, resampled=resampled,
                        start_batch=start_batch, expected_shape=shards.latent_shape, pin_memory=pin_memory)


def load_vae(shards: ShardSet):
    from data_pipeline.vae import load_vae_from_manifest

    return load_vae_from_manifest(shards.directory)
