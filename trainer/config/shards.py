"""The trainer's view of the latent shards: one shard set per resolution under ``data.root``."""
from __future__ import annotations

from dataclasses import dataclass

from trainer.config.schema import ConfigError


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
