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


def val_shard_set(cfg, stage, train: ShardSet, needed: int | None = None, purpose: str = "") -> ShardSet:
    """The validation shard set of ``stage``: ``data.val_root``/<resolution>, else the one the training shard set's
    manifest records (data_pipeline/val_split.py). ConfigError when there is none, it does not fit the stage or holds
    fewer than ``needed`` samples (default log.val_samples) for ``purpose`` (the key that needs it)."""
    import os

    from data_pipeline.manifest import check_shard_set, shard_set_dir
    from data_pipeline.val_split import recorded_val_dir

    if cfg.data.val_root:
        directory, where = shard_set_dir(cfg.data.val_root, stage.resolution), f"data.val_root={cfg.data.val_root}"
    else:
        directory = recorded_val_dir(train.directory, train.manifest)
        where = f"the validation set recorded in {train.directory}/manifest.json"
        if directory is None:
            raise ConfigError(f"{purpose or f'log.val_every={cfg.log.val_every}'} needs a validation shard set: {train.directory} "
                              f"records none (encode with --val-fraction or --val-list) and data.val_root is not set")
    if os.path.realpath(directory) == os.path.realpath(train.directory):
        raise ConfigError(f"{where}: {directory} is the training shard set itself; validation must be held out")
    try:
        manifest = check_shard_set(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{where}, resolution {stage.resolution}: {exc}") from None
    if tuple(manifest["latent_shape"]) != train.latent_shape:
        raise ConfigError(f"{where}: validation latents {tuple(manifest['latent_shape'])} do not match the training "
                          f"shard set's {train.latent_shape} at {stage.resolution} px")
    if needed is None:
        needed, purpose = cfg.log.val_samples, f"log.val_samples={cfg.log.val_samples}"
    if int(manifest["num_samples"]) < needed:
        raise ConfigError(f"{where}: {directory} holds {manifest['num_samples']} samples; {purpose} needs {needed}")
    return ShardSet(directory, manifest)


def check_held_out(val: ShardSet, train: ShardSet) -> None:
    """Refuse a validation set that shares sample keys with the training set (from the shard indexes)."""
    from data_pipeline.val_split import shard_set_keys

    shared = shard_set_keys(val.directory) & shard_set_keys(train.directory)
    if shared:
        raise ConfigError(f"validation shard set {val.directory} shares {len(shared)} sample key(s) with the training "
                          f"set {train.directory}, e.g. {sorted(shared)[:3]}: training would see validation samples")
