"""Sequential, validating reading of whole shards for ``LatentLoader`` (streaming, any URL ``gopen`` opens).

Every problem is counted and logged once per (shard, key) -- resampled streams re-read shards --
and a shard that yields fewer valid samples than its manifest records is reported with both counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .manifest import LABEL_FIELD, LATENT_FIELD
from .safety import LatentDecoder, SampleError, ShardError, decode_label, iter_tar_samples

if TYPE_CHECKING:
    from .loader import StreamConfig

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    stream: int
    skipped_samples: int = 0
    skipped_shards: int = 0
    valid_samples: int = 0
    bad_shards: tuple[str, ...] = ()
    short_shards: tuple[tuple[str, int, int], ...] = ()  # (url, expected, found valid)


class ShardReader:
    """Reads one shard at a time into validated (latent, label) pairs, counting what it skips."""

    def __init__(self, config: "StreamConfig", stream: int):
        self.config = config
        self.decoder = LatentDecoder(config.expected_shape, config.allowed_dtypes)
        self.stats = WorkerStats(stream)
        self.bad_shards: set[str] = set()
        self.short_shards: dict[str, tuple[int, int]] = {}
        self.expected = dict(config.expected_counts)
        self._warned: set[tuple[str, str | None]] = set()

    def _warn(self, url: str, key: str | None, message: str) -> None:
        if (url, key) not in self._warned:  # resampled streams re-read shards; say it once
            self._warned.add((url, key))
            log.warning("skipping %s: shard %s%s", message, url, f" key {key}" if key is not None else "")

    def _decode(self, fields: dict[str, bytes]) -> tuple[np.ndarray, int]:
        if "__duplicate__" in fields:
            raise SampleError(f"duplicate field {fields['__duplicate__'].decode()!r}")
        latent_bytes = fields.get(LATENT_FIELD)
        if latent_bytes is None:
            raise SampleError(f"missing field {LATENT_FIELD!r} (fields: {sorted(fields)})")
        label_bytes = fields.get(LABEL_FIELD)
        if label_bytes is None:
            raise SampleError(f"missing field {LABEL_FIELD!r} (fields: {sorted(fields)})")
        latent = self.decoder(latent_bytes)  # (C, H, W) read-only view
        label = decode_label(label_bytes, self.config.num_classes)
        if self.decoder.expected_shape is None:
            self.decoder.expected_shape = latent.shape  # no manifest: the first valid sample fixes it
        return latent, label

    def read(self, url: str) -> list[tuple[np.ndarray, int]]:
        from webdataset.gopen import gopen

        items: list[tuple[np.ndarray, int]] = []
        try:
            stream = gopen(url, "rb")
        except Exception as error:  # missing file, bad scheme, failed pipe
            self.stats.skipped_shards += 1
            self._warn(url, None, f"unreadable shard ({type(error).__name__}: {error})")
            self.bad_shards.add(url)
            self._check_count(url, 0, "unreadable")
            return items
        key = None
        broken: str | None = None
        try:
            for key, fields in iter_tar_samples(stream):
                try:
                    items.append(self._decode(fields))
                except SampleError as error:
                    self.stats.skipped_samples += 1
                    self._warn(url, key, f"sample ({error})")
        except (ShardError, OSError, ValueError) as error:
            broken = str(error)
            self.stats.skipped_shards += 1
            cut_key = getattr(error, "key", None)
            if cut_key is not None and cut_key != key:  # a sample none of whose members arrived whole
                self.stats.skipped_samples += 1
                self._warn(url, cut_key, f"sample cut off by a broken shard ({error})")
            self._warn(url, None, f"rest of shard ({error}; kept {len(items)} valid samples)")
        finally:
            try:
                stream.close()
            except Exception as error:  # a pipe: command that exited non-zero
                self.stats.skipped_shards += 0 if broken else 1
                self._warn(url, None, f"shard whose stream failed on close ({error})")
        if not items:
            self.bad_shards.add(url)
        self._check_count(url, len(items), broken)
        self.stats.valid_samples += len(items)
        return items

    def _check_count(self, url: str, found: int, broken: str | None) -> None:
        """Name a shard that came up short of its manifest count or broke off (once per shard)."""
        expected = self.expected.get(url)
        if expected is None or url in self.short_shards or (found >= expected and broken is None):
            return
        self.short_shards[url] = (expected, found)
        log.warning("short shard %s: expected %d samples (manifest), found %d valid%s", url, expected, found,
                    f"; {broken}" if broken else "")

    def snapshot(self) -> WorkerStats:
        return replace(self.stats, bad_shards=tuple(sorted(self.bad_shards)),
                       short_shards=tuple((url, *counts) for url, counts in sorted(self.short_shards.items())))
