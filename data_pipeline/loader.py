"""Deterministic, resumable streaming of latent shards.

Design (why it is not a plain ``wds.WebDataset(...).shuffle(n)`` chain):

* A rolling shuffle buffer makes batch k depend on every sample before it, so resuming at k
  means replaying the whole stream. Here each (rank, stream) reads its shards in *chunks*; a
  chunk's shard draws and its in-chunk permutation come from an RNG keyed by
  (seed, epoch, rank, stream, chunk index) alone. Resuming at batch k opens only the chunk that
  holds k.
* Resampled mode (the training default): every chunk draws shards with replacement from the
  whole list and emits exactly ``chunk_samples`` samples, so sample s of a stream always lives
  in chunk ``s // chunk_samples`` -- skipping is arithmetic, even when shards are corrupt.
* Finite mode: each epoch shuffles the shard list with (seed, epoch) -- the same on every rank --
  then takes ``shards[rank::world_size][stream::num_streams]``, so each sample is seen exactly
  once per epoch across ranks and workers. Chunks are consecutive shards pooled until
  ``shuffle_buffer`` samples. Resuming mid-epoch replays the epoch's batches and drops the first
  k (documented fallback: batch boundaries depend on how many samples survived validation).
  ``iter(loader)`` is one epoch in finite mode; ``loader.endless()`` rolls epochs over forever.
* Shards are read whole and in sequence by ``shard_reader.ShardReader``; a shard with fewer valid
  samples than its manifest records is logged with both counts and listed in ``short_shards``.
* For a batch order that does not depend on the data-parallel layout at all (and exact mid-epoch
  resume), use ``data_pipeline.elastic.ElasticStream``.
* With ``num_workers=W`` there are W streams; DataLoader hands out their batches round-robin, and
  on resume the workers are rotated so the round-robin continues at the right stream.
* Workers attach running skip counts to each batch, so ``skipped_samples``/``skipped_shards``
  in the main process are exact without shared memory.

Rank and world size are always passed in: this module never reads torch.distributed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .manifest import open_shard_set, resolve_shards
from .safety import ALLOWED_LATENT_DTYPES
from .shard_reader import ShardReader, WorkerStats

__all__ = ["LatentLoader", "NoValidSamplesError", "open_shard_set"]

STATE_VERSION = 1


class NoValidSamplesError(RuntimeError):
    """Every shard this rank can read is missing or holds no valid sample."""


@dataclass(frozen=True)
class StreamConfig:
    """Everything a worker needs; picklable so it crosses into DataLoader workers."""

    urls: tuple[str, ...]
    batch_size: int
    rank: int
    world_size: int
    seed: int
    num_streams: int
    shuffle_buffer: int
    resampled: bool
    epoch: int
    start_batch: int
    chunk_samples: int
    expected_shape: tuple[int, ...] | None
    allowed_dtypes: tuple[str, ...]
    num_classes: int | None
    drop_last: bool
    expected_counts: tuple[tuple[str, int], ...] = ()  # (url, samples the manifest records)


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


_RESAMPLED, _EPOCH_ORDER, _EPOCH_CHUNK = 1, 2, 3  # RNG domain tags keep the streams independent


def local_start_batch(start_batch: int, stream: int, num_streams: int) -> int:
    """How many of the first ``start_batch`` round-robin batches came from ``stream``."""
    return max(0, (start_batch - stream + num_streams - 1) // num_streams)


def _no_valid(urls: Sequence[str], reason: str) -> NoValidSamplesError:
    shown = ", ".join(list(urls)[:10]) + (f" ... (+{len(urls) - 10} more)" if len(urls) > 10 else "")
    return NoValidSamplesError(f"no valid samples: {reason}; shards: {shown}")


def resampled_samples(reader: ShardReader, config: StreamConfig, stream: int, first_sample: int) -> Iterator[tuple[np.ndarray, int]]:
    """Infinite stream; sample s comes from chunk s // chunk_samples regardless of history."""
    urls = config.urls
    chunk, offset = divmod(first_sample, config.chunk_samples)
    while True:
        rng = _rng(config.seed, _RESAMPLED, config.epoch, config.rank, config.world_size, stream, config.num_streams, chunk)
        pool: list[tuple[np.ndarray, int]] = []
        while len(pool) < config.chunk_samples:
            if len(reader.bad_shards) >= len(set(urls)):
                raise _no_valid(sorted(reader.bad_shards), "every shard is missing, unreadable or fully invalid")
            url = urls[int(rng.integers(len(urls)))]
            if url not in reader.bad_shards:
                pool.extend(reader.read(url))
        order = rng.permutation(len(pool))[: config.chunk_samples]
        for index in order[offset:]:
            yield pool[index]
        offset = 0
        chunk += 1


def epoch_shards(config: StreamConfig, stream: int) -> list[str]:
    """This (rank, stream)'s share of one finite epoch: disjoint across ranks and streams."""
    order = np.arange(len(config.urls))
    if config.shuffle_buffer > 0:
        order = _rng(config.seed, _EPOCH_ORDER, config.epoch).permutation(len(config.urls))
    mine = order[config.rank :: config.world_size][stream :: config.num_streams]
    return [config.urls[i] for i in mine]


def epoch_samples(reader: ShardReader, config: StreamConfig, stream: int) -> Iterator[tuple[np.ndarray, int]]:
    pool: list[tuple[np.ndarray, int]] = []
    chunk = 0
    shards = epoch_shards(config, stream)
    for position, url in enumerate(shards):
        pool.extend(reader.read(url))
        last = position == len(shards) - 1
        if pool and (last or len(pool) >= config.shuffle_buffer):
            if config.shuffle_buffer > 0:
                rng = _rng(config.seed, _EPOCH_CHUNK, config.epoch, config.rank, config.world_size, stream, config.num_streams, chunk)
                pool = [pool[i] for i in rng.permutation(len(pool))]
            yield from pool
            pool = []
            chunk += 1


class LatentStream(IterableDataset):
    """Yields (latents (B, C, H, W) float32, labels (B,) int64, WorkerStats) per batch.

    After a finite stream ends, one final (None, None, WorkerStats) carries the closing counts.
    """

    def __init__(self, config: StreamConfig):
        super().__init__()
        self.config = config

    def __iter__(self):
        config = self.config
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if config.resampled:
            stream = (worker + config.start_batch) % config.num_streams
            first_batch = local_start_batch(config.start_batch, stream, config.num_streams)
        else:
            stream, first_batch = worker, 0
        reader = ShardReader(config, stream)
        if config.resampled:
            samples = resampled_samples(reader, config, stream, first_batch * config.batch_size)
        else:
            samples = epoch_samples(reader, config, stream)
        yield from self._batches(samples, reader)
        if not config.resampled:
            yield None, None, reader.snapshot()

    def _batches(self, samples: Iterator[tuple[np.ndarray, int]], reader: ShardReader):
        size = self.config.batch_size
        latents: np.ndarray | None = None
        labels = np.empty(size, np.int64)
        filled = 0
        for latent, label in samples:
            if latents is None:
                latents = np.empty((size, *latent.shape), np.float32)  # (B, C, H, W)
            latents[filled] = latent  # fp16 -> fp32 during the copy, no per-sample torch op
            labels[filled] = label
            filled += 1
            if filled == size:
                yield torch.from_numpy(latents), torch.from_numpy(labels), reader.snapshot()
                latents, labels, filled = None, np.empty(size, np.int64), 0
        if filled and not self.config.drop_last:
            yield torch.from_numpy(latents[:filled].copy()), torch.from_numpy(labels[:filled].copy()), reader.snapshot()


class LatentLoader:
    """Batches of (latents (N, C, H, W) float32, labels (N,) int64) from latent shards.

    ``shards``: shard-set folder, manifest path, brace pattern, ``pipe:``/http(s) URL, or a list.
    Resampled (default): an endless stream; resume with ``start_batch=k`` or ``load_state_dict``.
    Finite: one epoch per ``iter()``; the epoch counter advances when an epoch completes.
    ``skipped_samples``/``skipped_shards`` count what validation rejected (for metrics).
    """

    def __init__(self, shards, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, shuffle_buffer: int = 1000, resampled: bool = True, epoch: int = 0,
                 start_batch: int = 0, expected_shape: Sequence[int] | None = None, drop_last: bool = True,
                 prefetch_factor: int = 4, pin_memory: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        urls, manifest = resolve_shards(shards)
        if not urls:
            raise ValueError(f"no shards found for {shards!r}")
        if not resampled and len(urls) < world_size:
            raise ValueError(f"{len(urls)} shard(s) cannot be split across {world_size} ranks for finite epochs; "
                             "write more shards or use resampled=True")
        self.urls = list(urls)
        self.manifest = manifest
        if expected_shape is None and manifest is not None:
            expected_shape = manifest["latent_shape"]
        self.latent_shape = tuple(int(d) for d in expected_shape) if expected_shape is not None else None
        dtypes = (manifest["latent_dtype"],) if manifest is not None else tuple(str(d) for d in ALLOWED_LATENT_DTYPES)
        typical = statistics.median(int(s["num_samples"]) for s in manifest["shards"]) if manifest else 0
        buffer = max(int(shuffle_buffer), 1)
        chunk_samples = int(math.ceil(buffer / typical) * typical) if typical >= 1 else buffer
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self._base = StreamConfig(
            urls=tuple(self.urls), batch_size=self.batch_size, rank=int(rank), world_size=int(world_size),
            seed=int(seed), num_streams=max(1, self.num_workers), shuffle_buffer=int(shuffle_buffer),
            resampled=bool(resampled), epoch=int(epoch), start_batch=0, chunk_samples=chunk_samples,
            expected_shape=self.latent_shape, allowed_dtypes=dtypes,
            num_classes=int(manifest["num_classes"]) if manifest and manifest.get("num_classes") else None,
            drop_last=bool(drop_last),
            expected_counts=tuple(zip(self.urls, (int(s["num_samples"]) for s in manifest["shards"]))) if manifest else (),
        )
        self.epoch = int(epoch)
        self.batches_consumed = int(start_batch)
        self._skipped_base = [0, 0]
        self._bad_shards: set[str] = set()
        self._short_shards: dict[str, tuple[int, int]] = {}
        self._live: dict[int, WorkerStats] = {}

    # -- metrics -----------------------------------------------------------------------------
    @property
    def skipped_samples(self) -> int:
        return self._skipped_base[0] + sum(s.skipped_samples for s in self._live.values())

    @property
    def skipped_shards(self) -> int:
        return self._skipped_base[1] + sum(s.skipped_shards for s in self._live.values())

    @property
    def bad_shards(self) -> list[str]:
        """Shards that yielded no valid sample (missing, unreadable or fully corrupt)."""
        return sorted(self._bad_shards.union(*(s.bad_shards for s in self._live.values())))

    @property
    def short_shards(self) -> dict[str, tuple[int, int]]:
        """Shard url -> (samples the manifest records, valid samples found) for shards that came up short."""
        short = dict(self._short_shards)
        for stats in self._live.values():
            short.update((url, (expected, found)) for url, expected, found in stats.short_shards)
        return short

    def _fold_live_stats(self) -> None:
        self._skipped_base[0] = self.skipped_samples
        self._skipped_base[1] = self.skipped_shards
        self._bad_shards = set(self.bad_shards)
        self._short_shards = self.short_shards
        self._live = {}

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        config = self._base
        return {
            "version": STATE_VERSION,
            "batches_consumed": self.batches_consumed,
            "epoch": self.epoch,
            "seed": config.seed,
            "rank": config.rank,
            "world_size": config.world_size,
            "num_streams": config.num_streams,
            "batch_size": config.batch_size,
            "resampled": config.resampled,
            "chunk_samples": config.chunk_samples,
            "num_shards": len(config.urls),
            "skipped_samples": self.skipped_samples,
            "skipped_shards": self.skipped_shards,
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue exactly where ``state`` was taken; ``strict`` refuses settings that change the stream."""
        if strict:
            mine = self.state_dict()
            keys = ("seed", "rank", "world_size", "num_streams", "batch_size", "resampled", "chunk_samples", "num_shards")
            differing = {k: (state.get(k), mine[k]) for k in keys if k in state and state[k] != mine[k]}
            if differing:
                raise ValueError(f"loader state does not match this loader (saved, current): {differing}; "
                                 "the stream would differ -- pass strict=False to accept that")
        self.batches_consumed = int(state["batches_consumed"])
        self.epoch = int(state.get("epoch", self.epoch))
        self._skipped_base = [int(state.get("skipped_samples", 0)), int(state.get("skipped_shards", 0))]
        self._live = {}

    # -- iteration ---------------------------------------------------------------------------
    def _source(self, config: StreamConfig):
        dataset = LatentStream(config)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                               pin_memory=self.pin_memory, persistent_workers=False))

    def endless(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches forever: in finite mode one epoch rolls into the next (``epoch`` advances) instead of ending.

        ``iter(loader)`` is one epoch in finite mode, so a trainer calling ``next()`` on it would hit
        StopIteration after the first epoch; this is the iterator such a trainer wants.
        """
        while True:
            from_start, count = self.batches_consumed == 0, 0
            for batch in self:
                count += 1
                yield batch
            if from_start and count == 0:
                raise ValueError(f"an epoch produced no batch of {self.batch_size} (drop_last with too few samples)")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        config = replace(self._base, epoch=self.epoch, start_batch=self.batches_consumed if self._base.resampled else 0)
        to_drop = 0 if config.resampled else self.batches_consumed  # finite-epoch resume: replay and drop
        finished = False
        try:
            for latents, labels, stats in self._source(config):
                self._live[stats.stream] = stats
                if latents is None:
                    continue
                if to_drop:
                    to_drop -= 1
                    continue
                self.batches_consumed += 1
                yield latents, labels
            finished = True
        finally:
            valid = sum(s.valid_samples for s in self._live.values())
            self._fold_live_stats()
        if finished and not config.resampled:
            if valid == 0:
                raise _no_valid(epoch_shards_for_rank(config), f"epoch {config.epoch} of rank {config.rank} read nothing usable")
            self.epoch += 1
            self.batches_consumed = 0


def epoch_shards_for_rank(config: StreamConfig) -> list[str]:
    return [url for stream in range(config.num_streams) for url in epoch_shards(config, stream)]
