"""ElasticStream: global batch k is the same set of samples for any data-parallel size, micro-batch and
worker count; epochs roll over with a fresh deterministic permutation; resume by sample position is
exact. Shards come from test_data_loader's id-coded writer: latent[0, 0, 0] holds the sample id."""

import json
import os
from collections import defaultdict

import numpy as np
import pytest
import torch

from data_pipeline import shard_index
from data_pipeline.elastic import ElasticDataError, ElasticStream, MicroBatch
from data_pipeline.loader import LatentLoader
from data_pipeline.sample_table import epoch_order
from test_data_loader import NUM_CLASSES, SHAPE, write_id_shards

NUM_SAMPLES = 200  # 8 shards x 25


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory):
    return write_id_shards(str(tmp_path_factory.mktemp("elastic") / "32"))


def check_sample_identity(batch: MicroBatch) -> None:
    ids = batch.latents[:, 0, 0, 0].long()
    assert batch.keys == [f"{i:08d}" for i in ids.tolist()], "key travelled with another latent"
    assert torch.equal(batch.labels, ids % NUM_CLASSES), "label travelled with another latent"


def global_batches(shards, num_batches, *, global_batch, micro_batch, dp_size, num_workers=0, **kw):
    """{batch index: [(position, key), ...] in position order}, merged over every rank of a layout."""
    out = defaultdict(list)
    for rank in range(dp_size):
        stream = ElasticStream(shards, global_batch=global_batch, micro_batch=micro_batch, dp_rank=rank,
                               dp_size=dp_size, num_workers=num_workers, **kw)
        iterator = iter(stream)
        for _ in range(num_batches * stream.grad_accum_steps):
            batch = next(iterator)
            check_sample_identity(batch)
            out[batch.batch_index].extend(zip(batch.positions.tolist(), batch.keys))
    return {k: sorted(v) for k, v in out.items()}


def test_global_batches_are_identical_for_every_layout(id_shards):
    """Batches 0..13 (crossing into epoch 1) over dp 1/2/4, micro 5/10, workers 0/2, with seed and block fixed."""
    common = dict(global_batch=20, seed=7, shuffle_block=60)
    reference = global_batches(id_shards, 14, micro_batch=5, dp_size=1, **common)
    assert len(reference) == 14 and all(len(v) == 20 for v in reference.values())
    assert [p for v in reference.values() for p, _ in v] == list(range(280))  # batch k = positions [20k, 20k+20)
    layouts = [dict(micro_batch=5, dp_size=2), dict(micro_batch=5, dp_size=4), dict(micro_batch=10, dp_size=2),
               dict(micro_batch=20, dp_size=1, num_workers=2), dict(micro_batch=5, dp_size=2, num_workers=2)]
    for layout in layouts:
        assert global_batches(id_shards, 14, **layout, **common) == reference, layout
    other_seed = global_batches(id_shards, 14, micro_batch=5, dp_size=1, global_batch=20, seed=8, shuffle_block=60)
    assert other_seed != reference


def test_workers_deliver_the_same_micro_batches_in_the_same_order(id_shards):
    args = dict(global_batch=24, micro_batch=4, dp_rank=1, dp_size=3, seed=1, shuffle_block=50)

    def take(num_workers, n=12):
        iterator = iter(ElasticStream(id_shards, num_workers=num_workers, **args))
        return [next(iterator) for _ in range(n)]

    plain, pooled = take(0), take(2)
    assert [(b.batch_index, b.micro, b.keys) for b in plain] == [(b.batch_index, b.micro, b.keys) for b in pooled]
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(plain, pooled))


def test_three_epochs_each_a_new_permutation_with_every_sample_once(id_shards):
    """Global batch 24 does not divide 200: batches straddle epochs, the epoch split is by position."""
    stream = ElasticStream(id_shards, global_batch=24, micro_batch=6, dp_size=1, seed=3, shuffle_block=60)
    iterator = iter(stream)
    by_position = {}
    epochs_seen = []
    for _ in range(25 * stream.grad_accum_steps):  # 25 x 24 = 600 positions = 3 epochs
        batch = next(iterator)
        check_sample_identity(batch)
        by_position.update(zip(batch.positions.tolist(), batch.keys))
        epochs_seen.append(batch.epoch)
    assert stream.epoch == 3 and stream.position == 600 and sorted(set(epochs_seen)) == [0, 1, 2]
    orders = [[by_position[p] for p in range(e * NUM_SAMPLES, (e + 1) * NUM_SAMPLES)] for e in range(3)]
    everything = sorted(f"{i:08d}" for i in range(NUM_SAMPLES))
    for order in orders:
        assert sorted(order) == everything  # each sample exactly once per epoch
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert stream.stats()["epoch"] == 3 and stream.stats()["epoch_progress"] == 3.0


def test_resume_mid_epoch_on_another_layout_reads_batch_k_next(id_shards):
    common = dict(global_batch=24, seed=5, shuffle_block=60)
    full = global_batches(id_shards, 20, micro_batch=6, dp_size=2, **common)
    first = ElasticStream(id_shards, micro_batch=6, dp_size=2, **common)
    iterator = iter(first)
    k = 11  # position 264: mid epoch 1
    for _ in range(k * first.grad_accum_steps):
        next(iterator)
    state = first.state_dict()
    assert state["position"] == k * 24 and first.epoch == 1
    for layout in (dict(micro_batch=3, dp_size=4, num_workers=2), dict(micro_batch=12, dp_size=1)):
        merged = defaultdict(list)
        for rank in range(layout["dp_size"]):
            stream = ElasticStream(id_shards, dp_rank=rank, **layout, **common)
            stream.load_state_dict(state)
            iterator = iter(stream)
            for _ in range(3 * stream.grad_accum_steps):
                batch = next(iterator)
                merged[k + batch.batch_index].extend(zip(batch.positions.tolist(), batch.keys))
        assert {b: sorted(v) for b, v in merged.items()} == {b: full[b] for b in (k, k + 1, k + 2)}, layout
    by_argument = global_batches(id_shards, 2, micro_batch=12, dp_size=1, start_position=k * 24, **common)
    assert by_argument == {0: full[k], 1: full[k + 1]}


def test_an_abandoned_step_is_delivered_again_whole(id_shards):
    stream = ElasticStream(id_shards, global_batch=12, micro_batch=4, seed=2)
    iterator = iter(stream)
    steps = [next(iterator) for _ in range(3 * 3 + 1)]  # three whole steps and one micro-batch of the fourth
    assert stream.position == 36
    again = next(iter(stream))
    assert (again.batch_index, again.micro, again.keys) == (3, 0, steps[-1].keys)


def test_changed_global_batch_continues_at_the_stored_position(id_shards):
    before = ElasticStream(id_shards, global_batch=10, micro_batch=5, seed=4)
    iterator = iter(before)
    seen = [next(iterator) for _ in range(2 * 7)]
    after = ElasticStream(id_shards, global_batch=16, micro_batch=8, seed=4, start_position=before.position)
    following = next(iter(after))
    reference = ElasticStream(id_shards, global_batch=2, micro_batch=2, seed=4)
    positions = iter(reference)
    flat = [next(positions) for _ in range(40)]  # positions 0..79, two at a time
    assert [k for b in seen for k in b.keys] == [k for b in flat[:35] for k in b.keys]
    assert following.positions.tolist() == list(range(70, 78))
    assert following.keys == [k for b in flat[35:39] for k in b.keys]


def test_epoch_order_is_a_seeded_permutation_with_shard_blocks():
    counts = [25] * 8
    order = epoch_order(counts, seed=0, epoch=0, shuffle_block=50)
    assert sorted(order.tolist()) == list(range(200))
    assert np.array_equal(order, epoch_order(counts, seed=0, epoch=0, shuffle_block=50))
    assert not np.array_equal(order, epoch_order(counts, seed=0, epoch=1, shuffle_block=50))
    assert not np.array_equal(order, epoch_order(counts, seed=1, epoch=0, shuffle_block=50))
    # a block of 50 positions draws on exactly two whole shards; a full shuffle mixes them all at once
    assert all(len(set(order[b:b + 50] // 25)) == 2 for b in range(0, 200, 50))
    assert len(set(epoch_order(counts, seed=0, epoch=0, shuffle_block=0)[:50] // 25)) == 8
    uneven = epoch_order([3, 0, 7, 1], seed=9, epoch=2, shuffle_block=4)
    assert sorted(uneven.tolist()) == list(range(11))


def test_epoch_order_is_pinned():
    """Runs resume across library upgrades only if the order never changes; this pins it."""
    # shard order 1, 2, 0 laid out as 4 5 6 | 7 8 9 10 11 | 0 1 2 3, shuffled in blocks of 5
    assert epoch_order([4, 3, 5], seed=1237, epoch=0, shuffle_block=5).tolist() == [6, 5, 7, 8, 4, 1, 11, 0, 10, 9, 3, 2]
    assert epoch_order([4, 3, 5], seed=1234, epoch=1, shuffle_block=0).tolist() == [7, 11, 8, 2, 1, 4, 5, 3, 6, 10, 0, 9]


def test_micro_batch_contract_and_stats(id_shards):
    stream = ElasticStream(id_shards, global_batch=8, micro_batch=4, dp_rank=1, dp_size=2, seed=0)
    batch = next(iter(stream))
    assert batch.latents.shape == (4, *SHAPE) and batch.latents.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and batch.positions.dtype == np.int64
    assert batch.positions.tolist() == [4, 5, 6, 7]  # rank 1's half of global batch 0
    latents, labels = batch  # unpacks like a LatentLoader batch
    assert latents is batch.latents and labels is batch.labels
    assert stream.stats() == {"epoch": 0, "epoch_progress": 8 / 200, "samples_per_epoch": 200, "skipped_samples": 0,
                              "short_shards": 0, "missing_samples": 0}
    for bad in (dict(global_batch=10, micro_batch=4), dict(global_batch=8, micro_batch=4, dp_rank=2, dp_size=2),
                dict(global_batch=8, micro_batch=4, start_position=-1)):
        with pytest.raises(ValueError):
            ElasticStream(id_shards, **bad)


def test_state_from_other_data_is_refused_unless_told(id_shards):
    stream = ElasticStream(id_shards, global_batch=8, micro_batch=8, seed=0)
    state = dict(stream.state_dict(), position=40, digest="0" * 40)
    with pytest.raises(ValueError, match="digest"):
        stream.load_state_dict(state)
    stream.load_state_dict(state, strict=False)
    assert next(iter(stream)).positions[0] == 40
    with pytest.raises(ValueError, match="seed"):
        stream.load_state_dict(dict(stream.state_dict(), seed=1))


def test_shard_writer_indexes_every_shard_and_the_index_matches_a_scan(id_shards):
    for name in ("latents-000000.tar", "latents-000007.tar"):
        path = os.path.join(id_shards, name)
        with open(shard_index.index_path(path)) as handle:
            written = json.load(handle)
        assert written == shard_index.scan_shard(path).to_json()
        assert written["complete"] and len(written["samples"]["key"]) == 25 and not written["problems"]


def test_index_cache_survives_a_copy_and_is_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    directory = write_id_shards(str(tmp_path / "32"), num_shards=1, per_shard=6)
    shard = os.path.join(directory, "latents-000000.tar")
    scans = []
    real_scan = shard_index.scan_shard
    monkeypatch.setattr(shard_index, "scan_shard", lambda path: scans.append(path) or real_scan(path))
    os.utime(shard, ns=(1, 1))  # what `cp -r` does to mtimes: size and content fingerprint still match
    assert shard_index.load_index(shard).num_entries == 6 and scans == []
    with open(shard, "r+b") as handle:
        handle.seek(-512, os.SEEK_END)
        handle.write(b"\1" * 512)  # same size, different tail, different mtime
    assert shard_index.load_index(shard).num_entries == 6 and scans == [shard]
    stored = os.stat(shard)
    with open(shard, "ab") as handle:
        handle.write(bytes(512))  # grows, mtime put back: the size alone says the index is stale
    os.utime(shard, ns=(stored.st_atime_ns, stored.st_mtime_ns))
    assert shard_index.load_index(shard).num_entries == 6 and len(scans) == 2
    # an unwritable shard folder: the index goes to the user cache instead
    monkeypatch.setenv(shard_index.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(shard_index, "index_path", lambda path: os.path.join(shard, "not-a-dir.json"))
    assert shard_index.load_index(shard).num_entries == 6 and len(scans) == 3
    assert os.path.exists(shard_index.cache_index_path(shard))
    assert shard_index.load_index(shard).num_entries == 6 and len(scans) == 3  # served from the user cache


def test_a_shard_rewritten_after_indexing_fails_loudly(tmp_path):
    directory = write_id_shards(str(tmp_path / "32"), num_shards=2, per_shard=5)
    stream = ElasticStream(directory, global_batch=10, micro_batch=10, shuffle=False)
    shard = os.path.join(directory, "latents-000001.tar")
    stat = os.stat(shard)
    with open(shard, "r+b") as handle:
        handle.seek(512)
        handle.write(b"\0" * 300)  # clobbers the first latent's npy header, same size
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ElasticDataError, match="latents-000001.tar key 00000005"):
        next(iter(stream))


def test_finite_latent_loader_rolls_epochs_over_with_endless(id_shards):
    loader = LatentLoader(id_shards, batch_size=25, seed=1, resampled=False, shuffle_buffer=60)
    iterator = loader.endless()
    epochs = [[i for _ in range(8) for i in next(iterator)[0][:, 0, 0, 0].long().tolist()] for _ in range(3)]
    assert all(sorted(e) == list(range(NUM_SAMPLES)) for e in epochs) and epochs[0] != epochs[1]
    assert loader.epoch == 2 and next(iterator) is not None and loader.epoch == 3
