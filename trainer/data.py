"""The trainer's view of the latent shards: one shard set per resolution under ``data.root``."""
from __future__ import annotations

from dataclasses import dataclass

from trainer.config import ConfigError


@dataclass(frozen=True)
class ShardSet:
    directory: str
    manifest: dict

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.manifest["latent_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])


def open_shard_set(root: str, resolution: int) -> ShardSet:
    """Validate the shard set for ``resolution`` under ``root``; ConfigError names what is missing."""
    from data_pipeline.manifest import check_shard_set, shard_set_dir

    if not root:
        raise ConfigError("config key 'data.root' is not set (a folder holding one shard set per resolution)")
    directory = shard_set_dir(root, resolution)
    try:
        manifest = check_shard_set(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data.root={root}, resolution {resolution}: {exc}") from None
    return ShardSet(directory, manifest)


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
