"""Shard-set manifest: the one JSON file that tells every consumer what a shard set holds.

Layout of a shard set (one per resolution under a data root)::

    ROOT/<resolution>/manifest.json          final manifest (written last, atomically)
    ROOT/<resolution>/latents-000000.tar     single-part encode
    ROOT/<resolution>/latents-003-000012.tar multi-part encode: part 3, shard 12 of that part
    ROOT/<resolution>/manifest-part003.json  per-part manifest, merged into manifest.json
    ROOT/<resolution>/classes.json           class index -> name
    ROOT/<resolution>/pca_autoencoder.npz    only for the offline PCA encoder

Each tar sample holds ``<key>.latent.npy`` (C x H x W, no pickle) and ``<key>.cls`` (ASCII int).

Manifest fields (``format`` = "dit-latents", ``format_version`` = 1):
    resolution, latent_shape [C, H, W], latent_dtype, num_samples, num_classes, class_names,
    shards [{"name", "num_samples"}], shard_pattern (glob of the shard file names),
    vae (JSON spec of the encoder, see ``data_pipeline.vae``), scaling_factor, shift_factor,
    source {kind, path, num_images, hflip}, parts (number of encode parts merged), created_by.

Shard URLs are resolved relative to the manifest's directory, so a shard set can be moved or
copied as a folder.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from typing import Any, Iterable, Sequence

FORMAT = "dit-latents"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CLASSES_NAME = "classes.json"
LATENT_FIELD = "latent.npy"
LABEL_FIELD = "cls"
SHARD_PATTERN = "latents-*.tar"

REQUIRED_FIELDS = (
    "format",
    "format_version",
    "latent_shape",
    "latent_dtype",
    "num_samples",
    "shards",
    "vae",
    "scaling_factor",
    "shift_factor",
)


def shard_file_name(index: int, part: int = 0, num_parts: int = 1) -> str:
    """Shard names carry the part number when several jobs write into one folder, so they never collide."""
    if num_parts > 1:
        return f"latents-{part:03d}-{index:06d}.tar"
    return f"latents-{index:06d}.tar"


def part_manifest_name(part: int) -> str:
    return f"manifest-part{part:03d}.json"


def write_json_atomic(path: str, payload: Any) -> None:
    """Write to a temp file in the same folder and rename, so readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users' jobs must read manifests
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def new_manifest(*, shards: Sequence[tuple[str, int]], latent_shape: Sequence[int], latent_dtype: str, vae: dict,
                 resolution: int | None = None, class_names: Sequence[str] = (), num_classes: int | None = None,
                 source: dict | None = None, part: tuple[int, int] | None = None,
                 created_by: str = "data_pipeline") -> dict:
    """Build a valid manifest from (shard name, sample count) pairs; the single place fields are spelt."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "resolution": resolution,
        "latent_shape": [int(d) for d in latent_shape],
        "latent_dtype": str(latent_dtype),
        "num_samples": sum(int(count) for _, count in shards),
        "num_classes": int(num_classes if num_classes is not None else len(class_names)),
        "class_names": list(class_names),
        "shards": [{"name": name, "num_samples": int(count)} for name, count in shards],
        "shard_pattern": SHARD_PATTERN,
        "vae": vae,
        "scaling_factor": float(vae.get("scaling_factor", 1.0)),
        "shift_factor": float(vae.get("shift_factor", 0.0)),
        "source": source or {},
        "created_by": created_by,
    }
    if part is not None:
        manifest["part"] = {"index": int(part[0]), "num_parts": int(part[1])}
    return validate_manifest(manifest)


def validate_manifest(manifest: dict, source: str = "manifest") -> dict:
    """Reject manifests that would make the loader or decoder guess."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{source}: manifest must be a JSON object, got {type(manifest).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in manifest]
    if missing:
        raise ValueError(f"{source}: manifest lacks required field(s) {missing}")
    if manifest["format"] != FORMAT:
        raise ValueError(f"{source}: format is {manifest['format']!r}, expected {FORMAT!r}")
    if int(manifest["format_version"]) > FORMAT_VERSION:
        raise ValueError(
            f"{source}: format_version {manifest['format_version']} is newer than this reader ({FORMAT_VERSION})"
        )
    shape = manifest["latent_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"{source}: latent_shape must be [C, H, W] of positive ints, got {shape!r}")
    if manifest["latent_dtype"] not in ("float16", "float32"):
        raise ValueError(f"{source}: latent_dtype must be float16 or float32, got {manifest['latent_dtype']!r}")
    for entry in manifest["shards"]:
        if not isinstance(entry, dict) or "name" not in entry or "num_samples" not in entry:
            raise ValueError(f"{source}: every shard entry needs 'name' and 'num_samples', got {entry!r}")
        if os.path.isabs(entry["name"]) or ".." in entry["name"].split("/"):
            raise ValueError(f"{source}: shard name {entry['name']!r} must be relative to the manifest folder")
    counted = sum(int(entry["num_samples"]) for entry in manifest["shards"])
    if counted != int(manifest["num_samples"]):
        raise ValueError(f"{source}: num_samples {manifest['num_samples']} != sum over shards {counted}")
    return manifest


def read_manifest(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    with open(path) as handle:
        try:
            manifest = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
    return validate_manifest(manifest, source=path)


def write_manifest(path: str, manifest: dict) -> None:
    write_json_atomic(path, validate_manifest(manifest, source=path))


def load_manifest(manifest_or_dir: str | dict) -> tuple[dict, str | None]:
    """Accept a manifest dict, a manifest path or a shard-set folder; return (manifest, folder)."""
    if isinstance(manifest_or_dir, dict):
        return validate_manifest(manifest_or_dir), None
    path = os.fspath(manifest_or_dir)
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    manifest = read_manifest(path)
    return manifest, os.path.dirname(os.path.abspath(path))


def shard_urls(manifest: dict, directory: str) -> list[str]:
    return [os.path.join(directory, entry["name"]) for entry in manifest["shards"]]


def shard_set_dir(root: str, resolution: int | None) -> str:
    return os.path.join(root, str(int(resolution))) if resolution is not None else root


def open_shard_set(root: str, resolution: int | None = None) -> tuple[list[str], dict]:
    """``ROOT/<resolution>/`` -> (shard paths, manifest); the loader's usual entry point."""
    directory = shard_set_dir(root, resolution)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"shard set folder not found: {directory}")
    manifest, directory = load_manifest(directory)
    return shard_urls(manifest, directory), manifest


def check_shard_set(root_or_dir: str, resolution: int | None = None, *, allow_missing_shards: bool = False) -> dict:
    """Validate a shard set before a run starts, naming exactly what is missing or wrong.

    The loader tolerates missing shards (skips and counts them); a trainer should still refuse to
    start on a set whose files are gone unless told otherwise, because the data mix would change.
    """
    directory = shard_set_dir(root_or_dir, resolution)
    if not os.path.isdir(directory):
        hint = ""
        if resolution is not None and os.path.isdir(root_or_dir):
            present = sorted(name for name in os.listdir(root_or_dir) if name.isdigit())
            hint = f" (resolutions present under {root_or_dir}: {present or 'none'})"
        raise FileNotFoundError(f"shard set folder not found: {directory}{hint}")
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        parts = sorted(glob.glob(os.path.join(directory, "manifest-part*.json")))
        hint = (
            f"; {len(parts)} part manifest(s) exist: run `python -m data_pipeline.encode merge-manifests --out {directory}`"
            if parts
            else ""
        )
        raise FileNotFoundError(f"manifest not found: {path}{hint}")
    manifest = read_manifest(path)
    if resolution is not None and manifest.get("resolution") is not None and int(manifest["resolution"]) != int(resolution):
        raise ValueError(f"{path}: resolution {manifest['resolution']} does not match requested {resolution}")
    if not manifest["shards"]:
        raise ValueError(f"{path}: lists no shards")
    missing = [url for url in shard_urls(manifest, directory) if not os.path.isfile(url)]
    if missing and (not allow_missing_shards or len(missing) == len(manifest["shards"])):
        shown = ", ".join(missing[:10]) + (f" ... (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise FileNotFoundError(f"{path}: {len(missing)} of {len(manifest['shards'])} shard file(s) missing: {shown}")
    vae = manifest["vae"]
    if isinstance(vae, dict) and vae.get("file"):
        vae_file = os.path.join(directory, vae["file"])
        if not os.path.isfile(vae_file):
            raise FileNotFoundError(f"{path}: encoder file named by the manifest is missing: {vae_file}")
    return manifest


def _expand_string(spec: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    return list(expand_urls(spec))


def resolve_shards(shards: str | os.PathLike | Sequence[str]) -> tuple[list[str], dict | None]:
    """Turn any accepted shard spec into (urls, manifest or None).

    Accepts a shard-set folder, a manifest path, a brace pattern, ``pipe:`` commands, http(s) URLs
    or a list of any of those (a list may not mix manifests with plain URLs' manifests).
    """
    if isinstance(shards, (str, os.PathLike)):
        spec = os.fspath(shards)
        if os.path.isdir(spec):
            manifest, directory = load_manifest(spec)
            return shard_urls(manifest, directory), manifest
        if spec.endswith(".json") and os.path.isfile(spec):
            manifest, directory = load_manifest(spec)
            return shard_urls(manifest, directory), manifest
        return _expand_string(spec), None
    urls: list[str] = []
    manifest = None
    for item in shards:
        sub_urls, sub_manifest = resolve_shards(item)
        urls.extend(sub_urls)
        if sub_manifest is not None:
            if manifest is not None and sub_manifest["latent_shape"] != manifest["latent_shape"]:
                raise ValueError("shard sets in one list must share latent_shape")
            manifest = manifest or sub_manifest
    return urls, manifest


def merge_part_manifests(directory: str, num_parts: int | None = None, *, write: bool = True) -> dict:
    """Combine ``manifest-partNNN.json`` files into ``manifest.json`` once every part is done."""
    paths = sorted(glob.glob(os.path.join(directory, "manifest-part*.json")))
    if not paths:
        raise FileNotFoundError(f"no part manifests (manifest-part*.json) in {directory}")
    parts = []
    for path in paths:
        with open(path) as handle:
            parts.append(validate_manifest(json.load(handle), source=path))
    expected = num_parts if num_parts is not None else int(parts[0].get("part", {}).get("num_parts", len(parts)))
    indices = sorted(int(p["part"]["index"]) for p in parts)
    if indices != list(range(expected)):
        missing = sorted(set(range(expected)) - set(indices))
        raise FileNotFoundError(f"{directory}: part manifests missing for part(s) {missing} of {expected}")
    parts.sort(key=lambda p: int(p["part"]["index"]))
    first = parts[0]
    for key in ("latent_shape", "latent_dtype", "vae", "scaling_factor", "shift_factor", "resolution"):
        for other in parts[1:]:
            if other.get(key) != first.get(key):
                raise ValueError(
                    f"{directory}: part {other['part']['index']} disagrees with part 0 on {key!r}: "
                    f"{other.get(key)!r} != {first.get(key)!r}"
                )
    merged = {k: v for k, v in first.items() if k != "part"}
    merged["shards"] = [entry for part in parts for entry in part["shards"]]
    merged["num_samples"] = sum(int(e["num_samples"]) for e in merged["shards"])
    merged["num_classes"] = max(int(p.get("num_classes", 0)) for p in parts)
    merged["parts"] = expected
    if "source" in merged:
        merged["source"] = dict(merged["source"], num_images=sum(int(p["source"].get("num_images", 0)) for p in parts))
    if write:
        write_manifest(os.path.join(directory, MANIFEST_NAME), merged)
    return merged


def write_classes(directory: str, class_names: Iterable[str]) -> None:
    write_json_atomic(os.path.join(directory, CLASSES_NAME), {str(i): name for i, name in enumerate(class_names)})
