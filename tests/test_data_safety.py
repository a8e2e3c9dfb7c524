"""Bad input: every kind of corrupt shard/sample is skipped, counted and named; pickles never run."""

import io
import logging
import os
import pickle
import tarfile

import numpy as np
import pytest

from data_pipeline.loader import LatentLoader, NoValidSamplesError
from data_pipeline.manifest import MANIFEST_NAME, check_shard_set, new_manifest, part_manifest_name, write_manifest
from data_pipeline.safety import LatentDecoder, SampleError, ShardError, decode_label, iter_tar_members, iter_tar_samples
from data_pipeline.shard_writer import ShardWriter

SHAPE = (4, 4, 4)
VAE = {"type": "diffusers", "name_or_path": "stabilityai/sd-vae-ft-ema", "scaling_factor": 0.18215, "shift_factor": 0.0}


class MarkerPayload:
    """Unpickling this creates ``path``: proof of code execution if it ever happens."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def npy(array, allow_pickle=False):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def latent(sample_id, dtype=np.float32, shape=SHAPE):
    array = np.full(shape, 0.5, dtype=dtype)
    array.flat[0] = sample_id
    return array


def write_raw_shard(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_good_shard(path, ids):
    with ShardWriter(path) as writer:
        for i in ids:
            writer.write(f"{i:08d}", latent(i), i % 5)


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    directory = str(root / "32")
    os.makedirs(directory)
    marker = str(root / "pwned.txt")
    payload = pickle.dumps(MarkerPayload(marker))
    write_good_shard(os.path.join(directory, "latents-000000.tar"), range(10))
    mixed = [
        ("00000010.latent.npy", npy(latent(10))), ("00000010.cls", b"0"),
        ("missing_cls.latent.npy", npy(latent(99))),
        ("missing_latent.cls", b"1"),
        ("bad_cls.latent.npy", npy(latent(99))), ("bad_cls.cls", b"abc"),
        ("neg_cls.latent.npy", npy(latent(99))), ("neg_cls.cls", b"-1"),
        ("range_cls.latent.npy", npy(latent(99))), ("range_cls.cls", b"99"),
        ("wrong_shape.latent.npy", npy(latent(99, shape=(4, 4, 5)))), ("wrong_shape.cls", b"1"),
        ("wrong_dtype.latent.npy", npy(latent(99, dtype=np.float16))), ("wrong_dtype.cls", b"1"),
        ("object_npy.latent.npy", npy(np.array([MarkerPayload(marker)] * 64, dtype=object).reshape(SHAPE), True)),
        ("object_npy.cls", b"1"),
        ("nan.latent.npy", npy(np.full(SHAPE, np.nan, np.float32))), ("nan.cls", b"1"),
        ("garbage.latent.npy", os.urandom(300)), ("garbage.cls", b"1"),
        ("dup.latent.npy", npy(latent(99))), ("dup.latent.npy", npy(latent(99))), ("dup.cls", b"1"),
        ("00000011.latent.npy", npy(latent(11))), ("00000011.cls", b"1"), ("00000011.pyd", payload),
        ("pickle_only.pickle", payload), ("pickle_only.pth", payload),
        ("00000012.latent.npy", npy(latent(12))), ("00000012.cls", b"2"),
    ]
    write_raw_shard(os.path.join(directory, "latents-000001.tar"), mixed)
    truncated = os.path.join(directory, "latents-000002.tar")
    write_good_shard(truncated, range(20, 30))
    with tarfile.open(truncated) as tar:
        cut = tar.getmember("00000026.latent.npy").offset_data + 100
    with open(truncated, "r+b") as handle:
        handle.truncate(cut)
    corrupt = os.path.join(directory, "latents-000004.tar")
    write_good_shard(corrupt, range(40, 45))
    with open(corrupt, "r+b") as handle:
        handle.seek(10)
        handle.write(b"XX")  # breaks the first header's checksum
    shards = [("latents-000000.tar", 10), ("latents-000001.tar", 16), ("latents-000002.tar", 10),
              ("latents-000003.tar", 10), ("latents-000004.tar", 5)]
    write_manifest(os.path.join(directory, MANIFEST_NAME),
                   new_manifest(shards=shards, latent_shape=SHAPE, latent_dtype="float32", vae=VAE, num_classes=5))
    return directory, marker, payload


EXPECTED_IDS = list(range(13)) + list(range(20, 26))
BAD_KEYS = ["missing_cls", "missing_latent", "bad_cls", "neg_cls", "range_cls", "wrong_shape", "wrong_dtype",
            "object_npy", "nan", "garbage", "dup", "pickle_only", "00000026"]


def read_all(directory, num_workers=0):
    loader = LatentLoader(directory, batch_size=4, resampled=False, shuffle_buffer=0, drop_last=False,
                          num_workers=num_workers)
    ids = [int(i) for latents, labels in loader for i in latents[:, 0, 0, 0]]
    return loader, ids


def test_bad_samples_and_shards_are_skipped_counted_and_named(bad_set, caplog):
    directory, marker, _ = bad_set
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        loader, ids = read_all(directory)
    assert ids == EXPECTED_IDS  # the good samples of every shard, truncated shard's head included
    assert loader.skipped_samples == len(BAD_KEYS)
    assert loader.skipped_shards == 3  # truncated, missing on disk, corrupt header
    assert loader.bad_shards == sorted(os.path.join(directory, f"latents-00000{i}.tar") for i in (3, 4))
    text = caplog.text
    for key in BAD_KEYS:
        shard = "latents-000002.tar" if key == "00000026" else "latents-000001.tar"
        assert any(f"{shard} key {key}" in r.getMessage() for r in caplog.records), key
    for reason in ("missing field 'cls'", "missing field 'latent.npy'", "malformed cls", "out of range",
                   "shape (4, 4, 5)", "dtype float16", "object dtype", "NaN", "duplicate field", "truncated tar",
                   "checksum", "latents-000003.tar"):
        assert reason in text, reason
    assert not os.path.exists(marker)


def test_skip_counts_are_aggregated_from_workers(bad_set):
    directory, marker, _ = bad_set
    loader, ids = read_all(directory, num_workers=2)
    assert sorted(ids) == EXPECTED_IDS
    assert (loader.skipped_samples, loader.skipped_shards) == (len(BAD_KEYS), 3)
    assert not os.path.exists(marker)


def test_resampled_stream_skips_bad_input_and_never_unpickles(bad_set):
    directory, marker, _ = bad_set
    loader = LatentLoader(directory, batch_size=8, shuffle_buffer=20, seed=0)
    for step, (latents, _) in enumerate(loader):
        assert set(latents[:, 0, 0, 0].long().tolist()) <= set(EXPECTED_IDS)
        if step == 30:
            break
    assert loader.skipped_samples > 0 and loader.skipped_shards > 0
    assert not os.path.exists(marker)


def test_payload_would_execute_if_unpickled(tmp_path):
    """Guards the test above: the planted payload really creates its marker when unpickled."""
    marker = tmp_path / "proof.txt"
    pickle.loads(pickle.dumps(MarkerPayload(str(marker)))).close()
    assert marker.exists()


def nothing_valid_set(tmp_path):
    directory = str(tmp_path / "32")
    os.makedirs(directory)
    write_raw_shard(os.path.join(directory, "latents-000000.tar"), [("a.cls", b"1"), ("b.latent.npy", b"junk")])
    shards = [("latents-000000.tar", 2), ("latents-000001.tar", 3)]
    write_manifest(os.path.join(directory, MANIFEST_NAME),
                   new_manifest(shards=shards, latent_shape=SHAPE, latent_dtype="float32", vae=VAE, num_classes=5))
    return directory


@pytest.mark.parametrize("resampled", [False, True])
def test_everything_invalid_stops_with_error_naming_shards(tmp_path, resampled):
    directory = nothing_valid_set(tmp_path)
    loader = LatentLoader(directory, batch_size=2, resampled=resampled)
    with pytest.raises(NoValidSamplesError, match=r"latents-000000\.tar.*latents-000001\.tar"):
        next(iter(loader))


def test_check_shard_set_names_what_is_missing(bad_set, tmp_path):
    directory, _, _ = bad_set
    root = os.path.dirname(directory)
    with pytest.raises(FileNotFoundError, match=r"latents-000003\.tar"):
        check_shard_set(root, 32)
    manifest = check_shard_set(root, 32, allow_missing_shards=True)
    assert manifest["num_samples"] == 51
    with pytest.raises(FileNotFoundError, match=r"resolutions present under .*\['32'\]"):
        check_shard_set(root, 64)
    empty = tmp_path / "64"
    empty.mkdir()
    (empty / part_manifest_name(0)).write_text("{}")
    with pytest.raises(FileNotFoundError, match="manifest.json.*merge-manifests"):
        check_shard_set(str(tmp_path), 64)
    (empty / MANIFEST_NAME).write_text('{"format": "dit-latents"}')
    with pytest.raises(ValueError, match="lacks required field"):
        check_shard_set(str(tmp_path), 64)


def test_decoder_rejects_object_arrays_before_touching_data(tmp_path):
    marker = tmp_path / "m.txt"
    blob = npy(np.array([MarkerPayload(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError, match="object dtype"):
        LatentDecoder(None)(blob)
    assert not marker.exists()
    with pytest.raises(ValueError):
        ShardWriter(str(tmp_path / "x.tar")).write("k", np.array([[[None]]], dtype=object), 0)


def test_decoder_is_a_zero_copy_view_with_exact_values():
    array = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float16)
    decoded = LatentDecoder(SHAPE, ("float16",))(npy(array))
    assert decoded.dtype == np.float16 and np.array_equal(decoded, array)
    fortran = LatentDecoder(SHAPE, ("float16",))(npy(np.asfortranarray(array)))
    assert np.array_equal(fortran, array)


@pytest.mark.parametrize("text,ok", [(b"7", True), (b" 12\n", True), (b"1_0", False), (b"+3", False), (b"", False),
                                     (b"\xff", False), (b"3.0", False)])
def test_label_decoding_is_strict(text, ok):
    if ok:
        assert decode_label(text) == int(text)
    else:
        with pytest.raises(SampleError):
            decode_label(text)


def test_tar_reader_handles_long_names_and_matches_tarfile(tmp_path):
    path = str(tmp_path / "long.tar")
    long_key = "d" * 120
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in (f"{long_key}.cls", "sub/dir/x.cls"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"4"))
    with open(path, "rb") as handle:
        assert [name for name, _ in iter_tar_members(handle)] == [f"{long_key}.cls", "sub/dir/x.cls"]
    with open(path, "rb") as handle:
        assert [key for key, _ in iter_tar_samples(handle)] == [long_key, "sub/dir/x"]


def test_failing_pipe_command_counts_as_a_skipped_shard(bad_set, caplog):
    directory, _, _ = bad_set
    good = os.path.join(directory, "latents-000000.tar")
    loader = LatentLoader([f"pipe:cat {directory}/no-such-shard.tar", good], batch_size=5, resampled=False,
                          shuffle_buffer=0, expected_shape=SHAPE)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        assert sum(len(labels) for _, labels in loader) == 10
    assert loader.skipped_shards == 1 and loader.bad_shards == [f"pipe:cat {directory}/no-such-shard.tar"]
    assert "no-such-shard.tar" in caplog.text


# -- short data is never silent (issue #14): cuts an interrupted copy leaves, and manifests that promise more --

SAMPLE_BYTES = 2048  # latent member (512 header + 384-byte npy padded to 512) + cls member (512 + 512)


def cut_at(path, size):
    with open(path, "r+b") as handle:
        handle.truncate(size)


@pytest.fixture(scope="module")
def short_set(tmp_path_factory):
    """Seven shards the manifest says hold 10 samples each; (expected, found usable) per damaged shard."""
    directory = str(tmp_path_factory.mktemp("short") / "32")
    os.makedirs(directory)
    paths = [os.path.join(directory, f"latents-{s:06d}.tar") for s in range(7)]
    for s, path in enumerate(paths[:5]):
        write_good_shard(path, range(10 * s, 10 * s + 10))
    write_good_shard(paths[5], range(50, 56))  # a whole archive, but 6 samples where the manifest says 10
    cut_at(paths[1], 2 * 4096)  # page-aligned cut between samples: parses as a valid, shorter archive
    cut_at(paths[2], 5 * SAMPLE_BYTES + 1024)  # 512-aligned cut between a sample's latent and its cls
    cut_at(paths[3], 2 * 4096 + 700)  # mid-block cut inside sample 34's latent
    cut_at(paths[4], 10 * SAMPLE_BYTES)  # every member there, end-of-archive blocks gone
    for path in paths[1:5]:
        os.remove(path + ".index.json")  # the writer indexed the whole shard; the cut copy gets indexed anew
    write_manifest(os.path.join(directory, MANIFEST_NAME),
                   new_manifest(shards=[(os.path.basename(p), 10) for p in paths], latent_shape=SHAPE,
                                latent_dtype="float32", vae=VAE, num_classes=5))
    expected = {"latents-000001.tar": (10, 4), "latents-000002.tar": (10, 5), "latents-000003.tar": (10, 4),
                "latents-000004.tar": (10, 10), "latents-000005.tar": (10, 6), "latents-000006.tar": (10, 0)}
    readable = list(range(10)) + list(range(10, 14)) + list(range(20, 25)) + list(range(30, 34)) + \
        list(range(40, 50)) + list(range(50, 56))
    return directory, expected, readable


def assert_named_with_counts(caplog, short):
    for name, (expected, found) in short.items():
        assert any(name in r.getMessage() and f"expected {expected} samples" in r.getMessage()
                   and f"found {found} " in r.getMessage() for r in caplog.records), (name, caplog.text)


def test_elastic_stream_names_every_short_shard_and_reads_the_rest(short_set, caplog):
    from data_pipeline.elastic import ElasticStream

    directory, short, readable = short_set
    with caplog.at_level(logging.WARNING):
        stream = ElasticStream(directory, global_batch=len(readable), micro_batch=len(readable), seed=0)
    assert stream.short_shards == short
    assert_named_with_counts(caplog, short)
    assert "latents-000004.tar" in caplog.text and "without its end-of-archive blocks" in caplog.text
    assert stream.skipped_samples == 2  # sample 25's latent without its cls; sample 34 lost in the cut
    assert stream.missing_samples == 6 + 5 + 6 + 0 + 4 + 10
    assert stream.stats()["short_shards"] == 6
    epoch = next(iter(stream))  # one global batch = one epoch of what is readable
    assert sorted(epoch.latents[:, 0, 0, 0].long().tolist()) == readable


@pytest.mark.parametrize("num_workers", [0, 2])
def test_latent_loader_names_every_short_shard(short_set, caplog, num_workers):
    directory, short, readable = short_set
    loader = LatentLoader(directory, batch_size=4, resampled=False, shuffle_buffer=0, drop_last=False,
                          num_workers=num_workers)
    with caplog.at_level(logging.WARNING):
        ids = [int(i) for latents, _ in loader for i in latents[:, 0, 0, 0]]
    assert sorted(ids) == readable
    assert {os.path.basename(url): counts for url, counts in loader.short_shards.items()} == short
    if num_workers == 0:  # worker processes log in their own process
        assert_named_with_counts(caplog, short)


def test_a_block_aligned_cut_is_an_error_not_a_shorter_archive(short_set):
    directory, _, _ = short_set
    with open(os.path.join(directory, "latents-000001.tar"), "rb") as handle:
        samples = []
        with pytest.raises(ShardError, match="end-of-archive"):
            for key, _ in iter_tar_samples(handle):
                samples.append(key)
    assert samples == [f"{i:08d}" for i in range(10, 14)]
    with tarfile.open(os.path.join(directory, "latents-000001.tar")) as tar:  # what tarfile makes of it: no error
        assert len(tar.getmembers()) == 8


def test_index_shards_command_lists_every_short_shard(short_set, capsys):
    from data_pipeline.index_shards import main

    directory, short, _ = short_set
    assert main([directory]) == 1
    lines = {line.split(":")[0].rsplit("/", 1)[-1]: line for line in capsys.readouterr().out.splitlines()}
    assert "ok" in lines["latents-000000.tar"]
    assert "MISSING (manifest: 10 samples)" in lines["latents-000006.tar"]
    assert "10 usable of 10 in the manifest" in lines["latents-000004.tar"] and "end-of-archive" in lines["latents-000004.tar"]
    assert "6 usable of 10 in the manifest" in lines["latents-000005.tar"]
    assert "4 usable of 10" in lines["latents-000001.tar"] and "BROKEN" in lines["latents-000001.tar"]
