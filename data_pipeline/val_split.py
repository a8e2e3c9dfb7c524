"""Held-out validation split: which source images go to a validation shard set, and reading it back.

The encode tool and the demo builder write the training shard set to ``OUT/<res>/`` and, with ``--val-fraction``
or ``--val-list``, a validation shard set to ``OUT/val/<res>/`` from images that are *not* in the training set
(a per-class, seeded choice, or an explicit list of image paths). The training manifest records it under
``validation`` (``dir`` relative to the training shard set, sample count, how it was chosen), so a run finds it
without configuration; ``data.val_root`` points a run at any other shard set instead. Validation keys carry the
``val-`` prefix, so a key seen in both sets is a leak, never a coincidence of numbering.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .images import ImageSource
from .manifest import MANIFEST_NAME, load_manifest, read_manifest, shard_urls, write_manifest

VAL_DIR = "val"
VAL_KEY_PREFIX = "val-"


class SubsetSource(ImageSource):
    """The images ``indices`` of ``parent`` (in that order), same classes."""

    def __init__(self, parent: ImageSource, indices: Sequence[int], role: str, split: dict):
        self.parent = parent
        self.indices = [int(i) for i in indices]
        items = [parent.items[i] for i in self.indices]
        super().__init__(items, parent.class_names, dict(parent.description, split=dict(split, role=role)))

    def load(self, index: int):
        return self.parent.load(self.indices[index])


def split_indices(labels: Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, validation) indices: per class, a seeded ``fraction`` of its images (at least one) is held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    val: list[int] = []
    for c in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue  # a class with one image keeps it for training
        k = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        rng = np.random.default_rng([int(seed), 0x7A1, int(c)])
        val.extend(members[rng.permutation(len(members))[:k]].tolist())
    held = set(val)
    return [i for i in range(len(labels)) if i not in held], sorted(val)


def list_indices(source: ImageSource, list_path: str) -> tuple[list[int], list[int]]:
    """(train, validation) indices: images named in ``list_path`` (one a line: an absolute path, a path relative to
    the list's folder, or the tail of an image's path such as ``<class>/<file>``) are held out. A name that matches
    no image is an error."""
    base = os.path.dirname(os.path.abspath(list_path))
    with open(list_path) as f:
        names = [line.split("\t")[0].strip() for line in f if line.strip() and not line.startswith("#")]
    paths = [os.path.normpath(os.path.abspath(item.path)) for item in source.items]
    val, unknown = set(), []
    for n in names:
        full = os.path.normpath(n if os.path.isabs(n) else os.path.join(base, n))
        tail = os.sep + os.path.normpath(n).lstrip(os.sep)
        hits = [i for i, p in enumerate(paths) if p == full or p.endswith(tail)]
        val.update(hits)
        if not hits:
            unknown.append(n)
    if unknown:
        raise ValueError(f"{list_path}: {len(unknown)} validation image(s) are not in the source, e.g. {unknown[:3]}")
    return [i for i in range(len(source)) if i not in val], sorted(val)


def split_source(source: ImageSource, *, fraction: float | None = None, val_list: str | None = None,
                 seed: int = 0) -> tuple[ImageSource, ImageSource]:
    """(training source, validation source) with no image in both."""
    if (fraction is None) == (val_list is None):
        raise ValueError("give exactly one of a validation fraction or a validation list")
    if val_list is not None:
        train, val = list_indices(source, val_list)
        how = {"list": os.path.abspath(val_list)}
    else:
        train, val = split_indices([source.label(i) for i in range(len(source))], fraction, seed)
        how = {"fraction": fraction, "seed": seed}
    if not val:
        raise ValueError("the validation split is empty")
    return SubsetSource(source, train, "train", how), SubsetSource(source, val, "validation", how)


def val_root(out: str) -> str:
    return os.path.join(out, VAL_DIR)


def record_validation(train_dir: str, val_dir: str, split: dict) -> dict:
    """Write the ``validation`` entry into the training shard set's manifest.json; returns the manifest."""
    path = os.path.join(train_dir, MANIFEST_NAME)
    manifest = read_manifest(path)
    val = read_manifest(os.path.join(val_dir, MANIFEST_NAME))
    manifest["validation"] = {"dir": os.path.relpath(val_dir, train_dir), "num_samples": int(val["num_samples"]),
                              "split": split, "key_prefix": VAL_KEY_PREFIX}
    write_manifest(path, manifest)
    return manifest


def recorded_val_dir(train_dir: str, manifest: dict | None = None) -> str | None:
    """The validation shard set a training shard set's manifest names (absolute), or None."""
    manifest = manifest if manifest is not None else read_manifest(os.path.join(train_dir, MANIFEST_NAME))
    entry = manifest.get("validation")
    if not entry:
        return None
    return os.path.normpath(os.path.join(train_dir, entry["dir"]))


def shard_set_keys(directory: str) -> set[str]:
    """Every sample key of a shard set (from the shard indexes; no latent is decoded)."""
    from .shard_index import load_index

    manifest, directory = load_manifest(directory)
    keys: set[str] = set()
    for url in shard_urls(manifest, directory):
        keys.update(load_index(url).keys)
    return keys


def read_samples(directory: str, limit: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, latents (N, C, H, W) float32, labels (N,) int64): the first ``limit`` usable samples of a shard set in
    manifest order (shard by shard, file order within a shard): the same samples on every rank and every call."""
    from .safety import ALLOWED_LATENT_DTYPES, LatentDecoder
    from .shard_index import load_index

    manifest, directory = load_manifest(directory)
    shape = tuple(manifest["latent_shape"])
    decoder = LatentDecoder(shape, ALLOWED_LATENT_DTYPES)
    keys, latents, labels = [], [], []
    want = int(manifest["num_samples"]) if limit is None else int(limit)
    for url in shard_urls(manifest, directory):
        index = load_index(url)
        usable, _ = index.usable(shape, num_classes=int(manifest.get("num_classes") or 0) or None)
        with open(url, "rb") as f:
            for i in np.flatnonzero(usable).tolist():
                if len(keys) >= want:
                    break
                f.seek(int(index.offsets[i]))
                latents.append(np.array(decoder(f.read(int(index.nbytes[i]))), dtype=np.float32))
                keys.append(index.keys[i])
                labels.append(int(index.labels[i]))
        if len(keys) >= want:
            break
    if not keys:
        return [], np.zeros((0, *shape), np.float32), np.zeros((0,), np.int64)
    return keys, np.stack(latents), np.asarray(labels, np.int64)


def link_validation(out: str, resolutions) -> list[int]:
    """Record OUT/val/<res> in OUT/<res>/manifest.json for every resolution where both manifests exist (the last
    part of a multi-part encode, or ``merge-manifests``, completes them). Returns the resolutions linked."""
    linked = []
    for r in resolutions:
        train_dir, val_dir = os.path.join(out, str(r)), os.path.join(val_root(out), str(r))
        if all(os.path.isfile(os.path.join(d, MANIFEST_NAME)) for d in (train_dir, val_dir)):
            split = read_manifest(os.path.join(val_dir, MANIFEST_NAME))["source"].get("split", {})
            record_validation(train_dir, val_dir, {k: v for k, v in split.items() if k != "role"})
            linked.append(int(r))
    return linked
