"""The global sample index of a shard set and its deterministic per-epoch order.

``SampleTable`` lists every *usable* sample of a shard set: shards in manifest order, samples in
file order, each with its shard, byte offset, label and key (from ``data_pipeline.shard_index``).
It is derived from the files alone, so every rank and worker that opens the same shard set builds
the same table; its ``digest`` lets a resumed run check that it still sees the same data.

``epoch_order`` is the order of epoch e: a permutation of [0, N) keyed by (seed, epoch) only. It is a
shard-block shuffle, the idea of MosaicML Streaming's ``py1b``: shuffle the shard order, lay the
shards' samples end to end, cut that sequence into blocks of ``shuffle_block`` samples and shuffle
inside each block. A stretch of consecutive positions then touches about ``shuffle_block``
samples' worth of shards instead of every shard of the set, which keeps reads local on data sets
larger than the page cache; ``shuffle_block=0`` shuffles the whole epoch at once.

Random numbers come from ``PCG64(SeedSequence(...)).random_raw``, whose output NumPy keeps stable
across versions (NEP 19), and permutations are ``argsort`` of those raw words, so an upgrade of
NumPy does not silently change a run's data order (``Generator.permutation`` carries no such promise).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np

from .shard_index import load_index

__all__ = ["SampleTable", "epoch_order", "SHUFFLE_BLOCK"]

log = logging.getLogger(__name__)
SHUFFLE_BLOCK = 1 << 18  # samples per shuffle block; MosaicML Streaming's minimum default block
_TAG_SHARDS, _TAG_SAMPLES = 0x5AD5, 0x5A3B  # RNG domain tags: shard order vs in-block order
_MAX_LOGGED_PER_SHARD = 5


def _raw(seed: int, tag: int, epoch: int, count: int) -> np.ndarray:
    """(count,) uint64 words that depend on (seed, tag, epoch) only."""
    return np.random.PCG64(np.random.SeedSequence([tag, int(epoch), int(seed) % 2**64])).random_raw(count)


def epoch_order(shard_counts, seed: int, epoch: int, shuffle_block: int = SHUFFLE_BLOCK) -> np.ndarray:
    """(N,) int64 permutation of sample ids 0..N-1 for ``epoch``; N = sum(shard_counts).

    Sample ids number samples shard by shard in manifest order (shard s owns the next
    ``shard_counts[s]`` ids). ``shuffle_block <= 0`` or >= N means one block: a full shuffle.
    """
    counts = np.asarray(shard_counts, np.int64)
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    shard_order = np.argsort(_raw(seed, _TAG_SHARDS, epoch, len(counts)), kind="stable")
    sizes = counts[shard_order]
    first_slot = np.cumsum(sizes) - sizes  # where each reordered shard begins in the laid-out sequence
    laid_out = np.repeat(starts[shard_order] - first_slot, sizes) + np.arange(total)  # (N,) ids, shard-shuffled
    block = total if shuffle_block <= 0 or shuffle_block >= total else int(shuffle_block)
    within = np.lexsort((_raw(seed, _TAG_SAMPLES, epoch, total), np.arange(total) // max(block, 1)))
    return laid_out[within]


@dataclass
class SampleTable:
    """Every usable sample of a shard set, in manifest order (arrays are (N,) per sample)."""

    paths: list[str]  # shard files, manifest order
    shard: np.ndarray  # int64 shard number of each sample
    offset: np.ndarray  # int64 byte offset of its latent.npy payload
    nbytes: np.ndarray  # int64 payload length
    label: np.ndarray  # int64
    key: np.ndarray  # bytes ('S') sample key, utf-8
    shard_counts: np.ndarray  # (S,) int64 usable samples per shard
    expected_counts: np.ndarray  # (S,) int64 samples per shard according to the manifest
    short_shards: dict[str, tuple[int, int]]  # shard name -> (expected, found usable); also broken archives
    skipped_samples: int  # samples present in the shards but unusable (invalid, or cut by a break)
    digest: str  # sha1 over shard names, keys, offsets and labels: identical data <=> identical digest

    @property
    def num_samples(self) -> int:
        return len(self.shard)

    @property
    def missing_samples(self) -> int:
        """Samples the manifest promises that this table does not have."""
        return int(np.maximum(self.expected_counts - self.shard_counts, 0).sum())

    @classmethod
    def build(cls, paths, expected_counts, *, expected_shape=None, allowed_dtypes=("float16", "float32"),
              num_classes: int | None = None) -> "SampleTable":
        """Index (or load cached indexes of) every shard and keep what a reader with these settings accepts.

        Shards that are missing, break off early, or hold fewer usable samples than the manifest
        says are logged by name with expected and found counts; the table holds what is readable.
        """
        parts: dict[str, list[np.ndarray]] = {name: [] for name in ("shard", "offset", "nbytes", "label", "key")}
        counts, short, skipped = [], {}, 0
        for number, (path, expected) in enumerate(zip(paths, expected_counts)):
            name = os.path.basename(path)
            try:
                index = load_index(path)
            except OSError as error:
                short[name] = (int(expected), 0)
                counts.append(0)
                log.warning("short shard %s: expected %d samples (manifest), found 0 usable; unreadable (%s)",
                            name, expected, error)
                continue
            mask, reasons = index.usable(expected_shape, allowed_dtypes, num_classes)
            skipped += len(reasons) + (index.cut_key is not None)
            for i, reason in sorted(reasons.items())[:_MAX_LOGGED_PER_SHARD]:
                log.warning("skipping sample: shard %s key %s (%s)", name, index.keys[i], reason)
            if len(reasons) > _MAX_LOGGED_PER_SHARD:
                log.warning("skipping %d more unusable samples in shard %s", len(reasons) - _MAX_LOGGED_PER_SHARD, name)
            found = int(mask.sum())
            counts.append(found)
            if found < expected or not index.complete:
                short[name] = (int(expected), found)
                why = [index.error] if index.error else []
                if index.cut_key is not None:
                    why.append(f"sample {index.cut_key} lost in the break")
                if reasons:
                    why.append(f"{len(reasons)} unusable sample(s) skipped")
                log.warning("short shard %s: expected %d samples (manifest), found %d usable; %s",
                            name, expected, found, "; ".join(why) or "the archive is complete but holds fewer samples")
            keep = np.flatnonzero(mask)
            parts["shard"].append(np.full(len(keep), number, np.int64))
            parts["offset"].append(index.offsets[keep])
            parts["nbytes"].append(index.nbytes[keep])
            parts["label"].append(index.labels[keep])
            parts["key"].append(np.array([index.keys[i].encode() for i in keep.tolist()], dtype=np.bytes_))
        arrays = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in parts.items()}
        if arrays["key"].dtype.kind != "S":
            arrays["key"] = arrays["key"].astype(np.bytes_)
        digest = hashlib.sha1()
        for path, count in zip(paths, counts):
            digest.update(f"{os.path.basename(path)}:{count};".encode())
        for name in ("key", "offset", "label"):
            digest.update(np.ascontiguousarray(arrays[name]).tobytes())
        return cls(paths=list(paths), shard=arrays["shard"], offset=arrays["offset"], nbytes=arrays["nbytes"],
                   label=arrays["label"], key=arrays["key"], shard_counts=np.asarray(counts, np.int64),
                   expected_counts=np.asarray(expected_counts, np.int64), short_shards=short,
                   skipped_samples=skipped, digest=digest.hexdigest())
