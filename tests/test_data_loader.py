"""LatentLoader: splitting, determinism, resume, shard specs. Synthetic id-coded latents make every
sample identifiable: latent[0, 0, 0] holds the sample id (float32 shards, exact)."""

import http.server
import os
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline.loader import LatentLoader, local_start_batch
from data_pipeline.manifest import MANIFEST_NAME, new_manifest, open_shard_set, write_manifest
from data_pipeline.shard_writer import ShardWriter

SHAPE = (4, 4, 4)
NUM_CLASSES = 5
VAE = {"type": "diffusers", "name_or_path": "stabilityai/sd-vae-ft-ema", "scaling_factor": 0.18215, "shift_factor": 0.0}


def write_id_shards(directory, num_shards=8, per_shard=25, dtype=np.float32):
    os.makedirs(directory, exist_ok=True)
    shards = []
    for s in range(num_shards):
        name = f"latents-{s:06d}.tar"
        with ShardWriter(os.path.join(directory, name)) as writer:
            for i in range(per_shard):
                sample_id = s * per_shard + i
                latent = np.full(SHAPE, 0.25, dtype=dtype)
                latent[0, 0, 0] = sample_id
                writer.write(f"{sample_id:08d}", latent, sample_id % NUM_CLASSES)
        shards.append((name, per_shard))
    manifest = new_manifest(shards=shards, latent_shape=SHAPE, latent_dtype=np.dtype(dtype).name, vae=VAE,
                            num_classes=NUM_CLASSES, resolution=32)
    write_manifest(os.path.join(directory, MANIFEST_NAME), manifest)
    return directory


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory):
    return write_id_shards(str(tmp_path_factory.mktemp("ids") / "32"))


def ids_of(batch):
    latents, labels = batch
    ids = latents[:, 0, 0, 0].long()
    assert torch.equal(labels, ids % NUM_CLASSES), "label travelled with a different latent"
    return ids.tolist()


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_batches_have_contract_dtypes_and_shapes(id_shards):
    latents, labels = take(LatentLoader(id_shards, batch_size=6, shuffle_buffer=50), 1)[0]
    assert latents.shape == (6, *SHAPE) and latents.dtype == torch.float32
    assert labels.shape == (6,) and labels.dtype == torch.long


@pytest.mark.parametrize("num_workers", [0, 2])
def test_finite_epoch_every_sample_once_across_ranks_and_workers(id_shards, num_workers):
    seen = Counter()
    for rank in range(2):
        loader = LatentLoader(id_shards, batch_size=7, rank=rank, world_size=2, seed=3, num_workers=num_workers,
                              resampled=False, drop_last=False, shuffle_buffer=30)
        for batch in loader:
            seen.update(ids_of(batch))
        assert loader.epoch == 1 and loader.skipped_samples == 0
    assert sorted(seen) == list(range(200)) and set(seen.values()) == {1}


def test_finite_epochs_reshuffle_but_keep_the_sample_set(id_shards):
    loader = LatentLoader(id_shards, batch_size=10, seed=1, resampled=False, shuffle_buffer=60)
    first = [i for batch in loader for i in ids_of(batch)]
    second = [i for batch in loader for i in ids_of(batch)]
    assert sorted(first) == sorted(second) == list(range(200))
    assert first != second and loader.epoch == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_seed_same_stream_other_rank_or_seed_differs(id_shards, num_workers):
    def stream(**kw):
        args = dict(batch_size=8, seed=11, num_workers=num_workers, world_size=2, rank=0, shuffle_buffer=40)
        args.update(kw)
        return take(LatentLoader(id_shards, **args), 10)

    reference = stream()
    assert same_batches(reference, stream())
    assert not same_batches(reference, stream(rank=1))
    assert not same_batches(reference, stream(seed=12))


def test_resampled_stream_mixes_shards_and_classes(id_shards):
    ids = [i for batch in take(LatentLoader(id_shards, batch_size=25, seed=0, shuffle_buffer=50), 8) for i in batch_ids(batch)]
    shards_seen = {i // 25 for i in ids}
    assert len(shards_seen) >= 4  # 8 batches of 25 from 8 shards drawn with replacement
    assert len({i % NUM_CLASSES for i in ids[:25]}) == NUM_CLASSES


def batch_ids(batch):
    return ids_of(batch)


@pytest.mark.parametrize("num_workers,k", [(0, 7), (2, 5), (2, 6)])
def test_resampled_resume_at_k_equals_uninterrupted(id_shards, num_workers, k):
    args = dict(batch_size=9, seed=5, num_workers=num_workers, shuffle_buffer=40, rank=1, world_size=3)
    uninterrupted = take(LatentLoader(id_shards, **args), k + 6)
    resumed = take(LatentLoader(id_shards, start_batch=k, **args), 6)
    assert same_batches(uninterrupted[k:], resumed)


def test_resume_via_state_dict_after_breaking_out(id_shards):
    args = dict(batch_size=8, seed=2, shuffle_buffer=40)
    uninterrupted = take(LatentLoader(id_shards, **args), 12)
    first = LatentLoader(id_shards, **args)
    assert same_batches(take(first, 4), uninterrupted[:4])
    state = first.state_dict()
    assert state["batches_consumed"] == 4
    second = LatentLoader(id_shards, **args)
    second.load_state_dict(state)
    assert same_batches(take(second, 8), uninterrupted[4:])
    with pytest.raises(ValueError, match="num_streams"):
        LatentLoader(id_shards, num_workers=2, **args).load_state_dict(state)


def test_finite_epoch_resume_mid_epoch(id_shards):
    args = dict(batch_size=9, seed=4, resampled=False, shuffle_buffer=60, drop_last=False)
    full = list(LatentLoader(id_shards, **args))
    resumed = list(LatentLoader(id_shards, start_batch=10, **args))
    assert same_batches(full[10:], resumed)


def test_local_start_batch_matches_round_robin():
    for workers in (1, 2, 3):
        for k in range(10):
            owners = Counter(b % workers for b in range(k))
            assert [local_start_batch(k, w, workers) for w in range(workers)] == [owners[w] for w in range(workers)]


def test_shard_spec_forms_give_the_same_stream(id_shards):
    urls, manifest = open_shard_set(os.path.dirname(id_shards), 32)
    args = dict(batch_size=5, seed=0, resampled=False, shuffle_buffer=0, drop_last=False, expected_shape=SHAPE)
    reference = list(LatentLoader(urls, **args))
    assert [i for b in reference for i in ids_of(b)] == list(range(200))  # no shuffle: shard order
    for spec in (id_shards, os.path.join(id_shards, MANIFEST_NAME),
                 os.path.join(id_shards, "latents-{000000..000007}.tar"),
                 [f"pipe:cat {u}" for u in urls]):
        assert same_batches(list(LatentLoader(spec, **args)), reference), spec
    assert manifest["num_samples"] == 200


def test_http_urls_stream_through_webdataset_gopen(id_shards):
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=id_shards, **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        loader = LatentLoader(f"http://127.0.0.1:{port}/latents-{{000000..000001}}.tar", batch_size=10,
                              resampled=False, shuffle_buffer=0, drop_last=False)
        assert [i for b in loader for i in ids_of(b)] == list(range(50))
    finally:
        server.shutdown()


def test_rejects_impossible_setups(id_shards):
    with pytest.raises(ValueError, match="cannot be split across 9 ranks"):
        LatentLoader(id_shards, batch_size=4, world_size=9, rank=0, resampled=False)
    with pytest.raises(ValueError, match="rank"):
        LatentLoader(id_shards, batch_size=4, world_size=2, rank=2)
    with pytest.raises(FileNotFoundError, match="manifest"):
        LatentLoader(os.path.dirname(id_shards), batch_size=4)
