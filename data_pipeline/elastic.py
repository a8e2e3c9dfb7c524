"""Elastic, exactly resumable latent stream: global batch k depends on (seed, k) alone, not on the layout.

Why (issue #14): a run resumed on another data-parallel size or worker count must continue the
same run. ``LatentLoader`` splits *shards* across ranks and workers, so which samples form a batch
depends on the layout, and finite epochs end the iterator. Here the anchor is MosaicML Streaming's
"elastic determinism" with instant mid-epoch resumption, done on our WebDataset tar shards:

* **Global sample space.** ``SampleTable`` (``data_pipeline.sample_table``) numbers every usable
  sample of the shard set, shards in manifest order; it is derived from the files alone (through
  the per-shard member-offset indexes of ``data_pipeline.shard_index``), so every rank agrees.
* **Positions.** Global position p = 0, 1, 2, ... runs across epochs: epoch ``p // N`` and sample
  ``epoch_order(seed, epoch)[p % N]``. Each epoch is a fresh deterministic permutation (a
  shard-block shuffle), so every sample is seen exactly once per epoch and epochs roll over
  forever: the iterator never ends.
* **Batches.** Global batch k (counted from ``start_position``) is positions
  ``[start_position + k*G, start_position + (k+1)*G)``, G = ``global_batch``. Micro-step m of data-parallel
  rank r takes the ``micro_batch`` positions starting at ``start_position + k*G + (m*dp_size + r)*micro_batch``.
  Each rank reads only its slice, by offset (one ``pread`` per sample), so the set of samples in
  batch k is the same for any dp_size, micro_batch and worker count. The trainer stores the
  *position* (``state_dict()["position"]``) and resumes with ``start_position=position``, which also
  covers a changed global batch or a deliberately skipped window of data.
* **Workers.** With ``num_workers=W``, worker w builds this rank's micro-batches w, w+W, w+2W, ...;
  the main process puts them back in sequence, so the output is identical to ``num_workers=0``.
* **Short data is never silent.** Missing shards, shards cut mid-member or at a block boundary
  (no tar end-of-archive blocks), and shards with fewer usable samples than the manifest records
  are logged by name with expected and found counts when the stream is built; ``short_shards``,
  ``skipped_samples`` and ``missing_samples`` expose them for metrics. The run uses what is readable.

Per-sample randomness belongs to the trainer: each ``MicroBatch`` carries the global ``positions``
of its samples so noise, timesteps and label drops can be keyed by (seed, step, position).

Usage::

    stream = ElasticStream(shard_dir, global_batch=256, micro_batch=32, dp_rank=r, dp_size=4, seed=seed,
                           start_position=saved_position)
    it = iter(stream)
    for step in ...:
        for micro in range(stream.grad_accum_steps):
            mb = next(it)                 # MicroBatch: latents (32, C, H, W) float32, labels, positions, keys
        metrics.update(stream.stats())     # epoch, skipped_samples, short_shards, ...
    checkpoint["data"] = stream.state_dict()

``position`` (and so ``state_dict()``) advances when the *last* micro-batch of a step is handed out,
so a checkpoint taken after the optimizer step resumes at the next step; a step abandoned half-way
is delivered again whole by the next ``iter()``. For progressive stages pass a stage-specific seed
(the trainer uses ``run.seed + 7919 * stage``) and a fresh stream per stage.

Start-up: every process loads the cached shard indexes (~50 bytes per sample held in memory, e.g.
64 MB for ImageNet's 1.28 M). Shards without an index are scanned once and the index cached; to
avoid N ranks scanning the same files, run ``python -m data_pipeline.index_shards DIR`` first, or
have rank i call ``shard_index.build_shard_set_indexes(DIR, part=i, num_parts=N)`` before a barrier.
Every process logs the same short-shard warnings; a trainer may quieten ranks other than 0.

Limits: shards must be local (or mounted) files, because samples are read by offset; stream
``pipe:``/http shards with ``LatentLoader(resampled=True)`` or copy them first. A shard that changes
after it was indexed raises ``ElasticDataError`` when read (the agreed order cannot be served). If
the set of usable samples changes between runs (a shard repaired or lost), N and the order change;
``load_state_dict`` refuses such a state unless ``strict=False``.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .loader import NoValidSamplesError
from .manifest import load_manifest, shard_urls
from .safety import LatentDecoder, SampleError
from .sample_table import SHUFFLE_BLOCK, SampleTable, epoch_order

__all__ = ["ElasticStream", "MicroBatch", "ElasticDataError", "SHUFFLE_BLOCK"]

log = logging.getLogger(__name__)
STATE_VERSION = 1
_MAX_OPEN_SHARDS = 64


class ElasticDataError(RuntimeError):
    """A shard changed or vanished after it was indexed: the agreed sample order can no longer be served."""


@dataclass
class MicroBatch:
    """One gradient-accumulation micro-batch of one data-parallel rank.

    Unpacks as ``latents, labels = batch`` so code written for ``LatentLoader`` keeps working.
    """

    latents: torch.Tensor  # (mb, C, H, W) float32
    labels: torch.Tensor  # (mb,) int64
    positions: np.ndarray  # (mb,) int64 global sample positions (key per-sample randomness by these); host data:
    # never copied to a device, so reading them is no device sync
    keys: list[str]  # sample keys, same order
    batch_index: int  # global batch number counted from start_position (0 = the batch at start_position)
    micro: int  # micro-step within the global batch, 0 .. grad_accum_steps-1
    epoch: int  # epoch of the global batch's first position

    def __iter__(self):
        return iter((self.latents, self.labels))

    def pin_memory(self) -> "MicroBatch":
        """Called by DataLoader(pin_memory=True) so the trainer's non_blocking copy really overlaps."""
        return replace(self, latents=self.latents.pin_memory(), labels=self.labels.pin_memory())


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to build micro-batch j of this rank; picklable."""

    table: SampleTable
    origin: int  # start_position: global batch 0 starts here
    first_batch: int  # the first global batch this iteration delivers (relative to origin)
    global_batch: int
    micro_batch: int
    dp_rank: int
    dp_size: int
    seed: int
    shuffle: bool
    shuffle_block: int
    latent_shape: tuple[int, ...]
    allowed_dtypes: tuple[str, ...]

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def positions(self, j: int) -> tuple[int, int, np.ndarray]:
        """(global batch index, micro-step, (mb,) int64 positions) of this rank's j-th micro-batch."""
        batch, micro = divmod(j, self.grad_accum_steps)
        first = self.origin + batch * self.global_batch + (micro * self.dp_size + self.dp_rank) * self.micro_batch
        return batch, micro, np.arange(first, first + self.micro_batch, dtype=np.int64)


class _Reader:
    """Turns positions into validated float32 latents by reading each sample at its indexed offset."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.table = plan.table
        self.decoder = LatentDecoder(plan.latent_shape, plan.allowed_dtypes)
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._fds: OrderedDict[int, int] = OrderedDict()

    def order(self, epoch: int) -> np.ndarray:
        """(N,) sample ids of ``epoch`` in position order; the last two epochs are kept (a batch may straddle)."""
        if epoch not in self._orders:
            if self.plan.shuffle:
                self._orders[epoch] = epoch_order(self.table.shard_counts, self.plan.seed, epoch, self.plan.shuffle_block)
            else:
                self._orders[epoch] = np.arange(self.table.num_samples, dtype=np.int64)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def samples(self, positions: np.ndarray) -> np.ndarray:
        """(mb,) global positions -> (mb,) sample ids."""
        count = self.table.num_samples
        epochs = positions // count
        ids = np.empty_like(positions)
        for epoch in np.unique(epochs).tolist():
            chosen = epochs == epoch
            ids[chosen] = self.order(epoch)[positions[chosen] % count]
        return ids

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            path = self.table.paths[shard]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as error:
                raise ElasticDataError(f"shard {path} was indexed but cannot be opened now ({error})") from error
            self._fds[shard] = fd
            while len(self._fds) > _MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def latents(self, ids: np.ndarray) -> np.ndarray:
        """(mb,) sample ids -> (mb, C, H, W) float32; reads go in file order, results in id order."""
        shards = self.table.shard[ids].tolist()
        offsets = self.table.offset[ids].tolist()
        sizes = self.table.nbytes[ids].tolist()
        out = np.empty((len(ids), *self.plan.latent_shape), np.float32)  # (mb, C, H, W)
        for i in sorted(range(len(ids)), key=lambda i: (shards[i], offsets[i])):
            data = os.pread(self._fd(shards[i]), sizes[i], offsets[i])
            try:
                if len(data) != sizes[i]:
                    raise SampleError(f"read {len(data)} of {sizes[i]} bytes")
                out[i] = self.decoder(data)  # fp16 -> fp32 during the copy
            except SampleError as error:
                raise ElasticDataError(
                    f"shard {self.table.paths[shards[i]]} key {self.table.key[ids[i]].decode()} at byte {offsets[i]} "
                    f"no longer matches its index ({error}); was the file rewritten in place?") from error
        return out

    def micro_batch(self, j: int) -> MicroBatch:
        batch, micro, positions = self.plan.positions(j)
        ids = self.samples(positions)
        epoch = (self.plan.origin + batch * self.plan.global_batch) // self.table.num_samples
        return MicroBatch(latents=torch.from_numpy(self.latents(ids)), labels=torch.from_numpy(self.table.label[ids]),
                          positions=positions, keys=[k.decode() for k in self.table.key[ids]],
                          batch_index=batch, micro=micro, epoch=int(epoch))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _MicroBatches(IterableDataset):
    """Endless micro-batches of one rank; worker w of W makes numbers w, w+W, ... (main process: all)."""

    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[MicroBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = _Reader(self.plan)
        j = self.plan.first_batch * self.plan.grad_accum_steps + worker
        try:
            while True:
                yield reader.micro_batch(j)
                j += workers
        finally:
            reader.close()


class ElasticStream:
    """Endless, layout-independent micro-batches of a shard set for one data-parallel rank (see module doc).

    ``shards``: shard-set folder or its manifest.json (local files). ``global_batch`` must be a multiple
    of ``micro_batch * dp_size``; ``grad_accum_steps`` = global_batch / (micro_batch * dp_size).
    ``seed`` fixes every epoch's order (mix the stage into it for progressive runs).
    ``start_position``: global sample position of the first sample of global batch 0.
    ``shuffle_block``: samples per shuffle block (0: shuffle whole epochs); ``shuffle=False``: manifest order.
    """

    def __init__(self, shards: str | os.PathLike, *, global_batch: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, start_position: int = 0, num_workers: int = 0,
                 expected_shape: Sequence[int] | None = None, shuffle: bool = True,
                 shuffle_block: int = SHUFFLE_BLOCK, prefetch_factor: int = 4, pin_memory: bool = False):
        if micro_batch < 1 or dp_size < 1 or global_batch % (micro_batch * dp_size):
            raise ValueError(f"global_batch {global_batch} must be a positive multiple of micro_batch {micro_batch} "
                             f"x dp_size {dp_size}")
        if global_batch < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need global_batch >= 1 and 0 <= dp_rank < dp_size, got {global_batch}, {dp_rank}, {dp_size}")
        if start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {start_position}")
        manifest, directory = load_manifest(os.fspath(shards))
        shape = tuple(int(d) for d in (expected_shape if expected_shape is not None else manifest["latent_shape"]))
        dtypes = (manifest["latent_dtype"],)
        table = SampleTable.build(shard_urls(manifest, directory), [int(s["num_samples"]) for s in manifest["shards"]],
                                  expected_shape=shape, allowed_dtypes=dtypes,
                                  num_classes=int(manifest.get("num_classes") or 0) or None)
        if table.num_samples == 0:
            raise NoValidSamplesError(f"no valid samples in {directory}: short shards {table.short_shards}")
        log.info("elastic stream over %s: %d usable samples in %d shards (%d expected, %d short shards, %d skipped)",
                 directory, table.num_samples, len(table.paths), int(table.expected_counts.sum()),
                 len(table.short_shards), table.skipped_samples)
        self.manifest = manifest
        self.num_workers = int(num_workers)
        self.prefetch_factor = prefetch_factor
        self.pin_memory = bool(pin_memory)
        self._plan = _Plan(table=table, origin=int(start_position), first_batch=0, global_batch=int(global_batch),
                           micro_batch=int(micro_batch), dp_rank=int(dp_rank), dp_size=int(dp_size), seed=int(seed),
                           shuffle=bool(shuffle), shuffle_block=int(shuffle_block), latent_shape=shape,
                           allowed_dtypes=dtypes)
        self.position = int(start_position)  # next global position not yet handed out as part of a whole step

    # -- what the trainer reads ---------------------------------------------------------------
    @property
    def table(self) -> SampleTable:
        return self._plan.table

    @property
    def grad_accum_steps(self) -> int:
        return self._plan.grad_accum_steps

    @property
    def samples_per_epoch(self) -> int:
        return self.table.num_samples

    @property
    def epoch(self) -> int:
        """Epoch of the next step's first sample."""
        return self.position // self.samples_per_epoch

    @property
    def skipped_samples(self) -> int:
        return self.table.skipped_samples

    @property
    def short_shards(self) -> dict[str, tuple[int, int]]:
        """Shard name -> (samples the manifest records, usable samples found), for short or broken shards."""
        return dict(self.table.short_shards)

    @property
    def missing_samples(self) -> int:
        return self.table.missing_samples

    def stats(self) -> dict:
        """Numbers for metrics.jsonl / W&B / status; identical on every rank."""
        return {"epoch": self.epoch, "epoch_progress": self.position / self.samples_per_epoch,
                "samples_per_epoch": self.samples_per_epoch, "skipped_samples": self.skipped_samples,
                "short_shards": len(self.table.short_shards), "missing_samples": self.missing_samples}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "position": self.position, "seed": self._plan.seed,
                "shuffle": self._plan.shuffle, "shuffle_block": self._plan.shuffle_block,
                "samples_per_epoch": self.samples_per_epoch, "digest": self.table.digest}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue at ``state["position"]`` (batch_index restarts at 0 there); ``strict`` refuses a changed order."""
        mine = self.state_dict()
        differing = {k: (state[k], mine[k]) for k in ("seed", "shuffle", "shuffle_block", "samples_per_epoch", "digest")
                     if k in state and state[k] != mine[k]}
        if differing:
            message = f"data stream state does not match this stream (saved, current): {differing}"
            if strict:
                raise ValueError(message + "; the sample order would differ -- pass strict=False to accept that")
            log.warning("%s; continuing at position %d with the current order", message, int(state["position"]))
        self.position = int(state["position"])
        self._plan = replace(self._plan, origin=self.position)

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[MicroBatch]:
        """Micro-batches from ``position`` on, forever; a step abandoned half-way is delivered again whole."""
        plan = replace(self._plan, first_batch=(self.position - self._plan.origin) // self._plan.global_batch)
        gas = plan.grad_accum_steps
        expected = plan.first_batch * gas
        pending: dict[int, MicroBatch] = {}
        for item in self._source(plan):
            number = item.batch_index * gas + item.micro
            if number < expected or number in pending:
                raise RuntimeError(f"loader workers delivered micro-batch {number} twice")
            pending[number] = item
            if len(pending) > 4 * max(1, self.num_workers) * self.prefetch_factor:
                raise RuntimeError(f"loader workers out of step: waiting for micro-batch {expected}, have {sorted(pending)}")
            while expected in pending:
                batch = pending.pop(expected)
                expected += 1
                if batch.micro == gas - 1:
                    self.position = plan.origin + (batch.batch_index + 1) * plan.global_batch
                yield batch

    def _source(self, plan: _Plan) -> Iterator[MicroBatch]:
        dataset = _MicroBatches(plan)
        if self.num_workers == 0:
            if self.pin_memory and torch.cuda.is_available():
                return (batch.pin_memory() for batch in dataset)
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                               prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                               persistent_workers=False))
