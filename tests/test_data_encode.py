"""Encode tool: parts write disjoint shards covering every image once; reruns skip finished shards;
the embedded demo builds train-ready shard sets."""

import glob
import json
import os
import time
from collections import Counter

import numpy as np
import pytest

from data_pipeline.demo_data import DEMO_PHOTOS, available_photos, build_demo_data, export_demo_photos
from data_pipeline.encode import build_parser, main, part_range, plan_items
from data_pipeline.loader import LatentLoader
from data_pipeline.manifest import check_shard_set, read_manifest
from data_pipeline.safety import iter_tar_samples


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    return export_demo_photos(str(tmp_path_factory.mktemp("photos")))


def shard_keys(path):
    with open(path, "rb") as handle:
        return [key for key, _ in iter_tar_samples(handle)]


def encode_part(photo_dir, out, pca, part, extra=()):
    return main(["--input", photo_dir, "--out", out, "--resolutions", "32", "64", "--hflip", "--pca-file", pca,
                 "--samples-per-shard", "3", "--num-shards-total", "2", "--shard-index", str(part), "--no-progress",
                 *extra])


@pytest.fixture(scope="module")
def two_parts(photo_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("encoded"))
    pca = os.path.join(out, "shared_pca.npz")
    assert main(["fit-pca", "--input", photo_dir, "--out", pca, "--resolutions", "32", "64"]) == 0
    assert encode_part(photo_dir, out, pca, 0) == 0
    assert not os.path.exists(os.path.join(out, "64", "manifest.json"))  # part 1 still missing
    assert encode_part(photo_dir, out, pca, 1) == 0
    return out, pca


def test_two_parts_write_disjoint_shards_holding_every_image_once(two_parts):
    out, _ = two_parts
    num_photos = len(available_photos())
    for resolution in (32, 64):
        directory = os.path.join(out, str(resolution))
        part0 = sorted(glob.glob(os.path.join(directory, "latents-000-*.tar")))
        part1 = sorted(glob.glob(os.path.join(directory, "latents-001-*.tar")))
        assert len(part0) == len(part1) == 3  # 8 items per part, 3 per shard
        keys = [key for path in part0 + part1 for key in shard_keys(path)]
        assert sorted(keys) == [f"{i:010d}" for i in range(2 * num_photos)]  # every (image, flip) exactly once
        manifest = check_shard_set(out, resolution)
        assert manifest["num_samples"] == 2 * num_photos and manifest["parts"] == 2
        assert manifest["latent_shape"] == [4, resolution // 8, resolution // 8]
        assert [s["name"] for s in manifest["shards"]] == [os.path.basename(p) for p in part0 + part1]
        labels = [int(label) for _, labels in LatentLoader(directory, batch_size=4, resampled=False, shuffle_buffer=0)
                  for label in labels]
        assert Counter(labels) == {label: 2 for label in range(num_photos)}  # both orientations of each photo
        names = json.load(open(os.path.join(directory, "classes.json")))
        assert sorted(names.values()) == sorted(name for name, _ in available_photos())


def test_parts_share_one_pca_and_the_manifest_pins_it(two_parts):
    out, pca = two_parts
    manifest = read_manifest(os.path.join(out, "64", "manifest.json"))
    assert manifest["vae"]["type"] == "pca" and manifest["vae"]["file"] == "shared_pca.npz"
    assert open(os.path.join(out, "64", "shared_pca.npz"), "rb").read() == open(pca, "rb").read()


def test_rerun_skips_finished_shards_and_redoes_only_missing_ones(two_parts, photo_dir):
    out, pca = two_parts
    shards = sorted(glob.glob(os.path.join(out, "*", "latents-000-*.tar")))
    before = {path: os.stat(path).st_mtime_ns for path in shards}
    content = {path: open(path, "rb").read() for path in shards}
    time.sleep(0.01)
    removed = os.path.join(out, "64", "latents-000-000001.tar")
    os.unlink(removed)
    with open(removed + ".tmp-12345", "wb") as stale:  # an interrupted write must not count as finished
        stale.write(b"partial")
    cut = os.path.join(out, "32", "latents-000-000000.tar")
    with open(cut, "r+b") as handle:  # an interrupted copy: a 512-aligned cut reads like a shorter archive
        handle.truncate(4096)
    assert encode_part(photo_dir, out, pca, 0) == 0
    for path in shards:
        if path in (removed, cut):
            assert open(path, "rb").read() == content[path]  # deterministic: byte-identical rewrite
        else:
            assert os.stat(path).st_mtime_ns == before[path], f"{path} was rewritten"
    assert check_shard_set(out, 64)["num_samples"] == 2 * len(available_photos())


def test_rerun_with_a_different_configuration_is_refused(two_parts, photo_dir):
    out, pca = two_parts
    with pytest.raises(ValueError, match="different encode configuration.*samples_per_shard"):
        main(["--input", photo_dir, "--out", out, "--resolutions", "32", "--hflip", "--pca-file", pca,
              "--samples-per-shard", "4", "--num-shards-total", "2", "--shard-index", "0", "--no-progress"])


def test_several_parts_with_pca_need_a_shared_file(photo_dir, tmp_path):
    with pytest.raises(SystemExit, match="fit-pca"):
        main(["--input", photo_dir, "--out", str(tmp_path), "--resolutions", "32", "--num-shards-total", "2",
              "--shard-index", "1", "--no-progress"])


def test_merge_manifests_command_rebuilds_the_manifest(two_parts, capsys):
    out, _ = two_parts
    path = os.path.join(out, "32", "manifest.json")
    original = read_manifest(path)
    os.unlink(path)
    assert main(["merge-manifests", "--out", out]) == 0
    assert read_manifest(path) == original
    assert "16 samples" in capsys.readouterr().out


def test_slurm_array_variables_pick_the_part(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    args = build_parser()["encode"].parse_args(["--input", "x", "--out", "y"])
    assert (args.num_shards_total, args.shard_index) == (4, 2)


def test_plan_is_deterministic_and_parts_tile_it():
    assert plan_items(10, True, 7) == plan_items(10, True, 7)
    assert sorted(plan_items(10, True, 7)) == [(i, f) for i in range(10) for f in (False, True)]
    for parts in (1, 3, 7):
        ranges = [part_range(20, parts, p) for p in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == 20 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_file_list_source_encodes_single_part_with_on_the_fly_pca(photo_dir, tmp_path):
    listing = tmp_path / "list.tsv"
    photos = sorted(glob.glob(os.path.join(photo_dir, "*", "*")))[:4]
    listing.write_text("".join(f"{os.path.relpath(p, tmp_path)}\t{i % 2}\n" for i, p in enumerate(photos)))
    out = str(tmp_path / "out")
    assert main(["--file-list", str(listing), "--out", out, "--resolutions", "32", "--no-progress"]) == 0
    manifest = check_shard_set(out, 32)
    assert manifest["num_samples"] == 4 and manifest["num_classes"] == 2 and manifest["source"]["kind"] == "file_list"
    os.unlink(os.path.join(out, "32", "pca_autoencoder.npz"))
    with pytest.raises(FileNotFoundError, match="encoder file"):
        check_shard_set(out, 32)


def test_demo_data_builds_train_ready_shard_sets(tmp_path):
    manifests = build_demo_data(str(tmp_path), (64, 128), samples_per_class=25, seed=0, samples_per_shard=50, vae="pca")
    assert set(manifests) == {64, 128}
    assert len(available_photos()) == len(DEMO_PHOTOS) == 8
    for resolution in (64, 128):
        manifest = check_shard_set(str(tmp_path), resolution)
        assert manifest["num_samples"] == 200 and manifest["num_classes"] == 8
        assert manifest["latent_shape"] == [4, resolution // 8, resolution // 8]
        assert manifest["class_names"][1] == "cat"
        latents, labels = next(iter(LatentLoader(os.path.join(str(tmp_path), str(resolution)), batch_size=64)))
        assert 0.6 < latents.std().item() < 1.5 and len(set(labels.tolist())) >= 6


def test_demo_data_is_byte_identical_for_a_seed(tmp_path):
    def build(name, seed):
        build_demo_data(str(tmp_path / name), (64,), samples_per_class=6, seed=seed, samples_per_shard=16, vae="pca")
        paths = sorted(glob.glob(str(tmp_path / name / "64" / "*")))
        files = {os.path.basename(p): open(p, "rb").read() for p in paths}
        for file_name in [f for f in files if f.endswith(".index.json")]:  # shard indexes record the file's mtime
            index = json.loads(files.pop(file_name))
            files[file_name] = index["mtime_ns"] > 0 and {k: v for k, v in index.items() if k != "mtime_ns"}
        return files

    first = build("a", 0)
    assert first == build("b", 0)
    assert first["latents-000000.tar"] != build("c", 1)["latents-000000.tar"]


def test_demo_data_cli(tmp_path, capsys):
    from data_pipeline.demo_data import main as demo_main

    assert demo_main(["--out", str(tmp_path), "--resolutions", "64", "--samples-per-class", "5", "--vae", "pca", "--no-progress"]) == 0
    assert "40 samples, 8 classes" in capsys.readouterr().out
    assert np.isclose(check_shard_set(str(tmp_path), 64)["scaling_factor"], read_manifest(
        os.path.join(str(tmp_path), "64", "manifest.json"))["vae"]["scaling_factor"])
