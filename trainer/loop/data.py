"""The loop's data hook-up: each stage's latent stream, and the VAE that decodes its samples.

Default: ``data_pipeline.elastic.ElasticStream``. Global batch k of a stage is the samples at positions
[position₀ + k·G, position₀ + (k+1)·G) of a per-epoch permutation keyed by (seed, stage) alone, so it is the same
set of samples on 1, 2 or 64 data-parallel ranks and any worker count; each rank reads only its slice, epochs roll
over, and a resume continues at the stored sample position (``TrainerState.data_position``). Every micro-batch
carries its samples' global positions, and the loop keys noise, timesteps and label drops by them
(trainer/loop/seeding.py), so the randomness follows the sample, not the rank.

``data.resampled: true`` keeps the older order-free resampled ``LatentLoader`` (for ``pipe:``/http shards, which
cannot be read by offset); its batches depend on the layout, and its randomness is keyed by the rank.
"""
from __future__ import annotations

from trainer.config.shards import ShardSet


class ResampledBatches:
    """``LatentLoader(resampled=True)`` behind the stream interface the loop uses."""

    def __init__(self, shards: ShardSet, *, micro_batch: int, dp_rank: int, dp_size: int, seed: int, num_workers: int,
                 shuffle_buffer: int, start_batch: int, pin_memory: bool):
        from data_pipeline.loader import LatentLoader

        self.loader = LatentLoader(shards.directory, batch_size=micro_batch, rank=dp_rank, world_size=dp_size,
                                   seed=seed, num_workers=num_workers, shuffle_buffer=shuffle_buffer, resampled=True,
                                   start_batch=start_batch, expected_shape=shards.latent_shape, pin_memory=pin_memory)

    def __iter__(self):
        return iter(self.loader)

    @property
    def skipped_samples(self) -> int:  # this rank's count: the monitor sums ranks
        return self.loader.skipped_samples

    def stats(self) -> dict:
        return {"short_shards": len(getattr(self.loader, "short_shards", {}) or {})}


def make_stream(shards: ShardSet, *, resampled: bool, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                seed: int, num_workers: int, shuffle_buffer: int, shuffle_block: int, start_position: int,
                start_batch: int, pin_memory: bool = False):
    """The stage's stream. ``pin_memory`` (CUDA runs): batches are pinned in the DataLoader's pin thread (or here
    with no workers), so the trainer's ``non_blocking`` host-to-device copy really overlaps the step."""
    if resampled:
        return ResampledBatches(shards, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                                num_workers=num_workers, shuffle_buffer=shuffle_buffer, start_batch=start_batch,
                                pin_memory=pin_memory)
    from data_pipeline.elastic import ElasticStream

    return ElasticStream(shards.directory, global_batch=global_batch, micro_batch=micro_batch, dp_rank=dp_rank,
                         dp_size=dp_size, seed=seed, start_position=start_position, num_workers=num_workers,
                         expected_shape=shards.latent_shape, shuffle_block=shuffle_block, pin_memory=pin_memory)


def load_vae(shards: ShardSet):
    from data_pipeline.vae import load_vae_from_manifest

    return load_vae_from_manifest(shards.directory)
