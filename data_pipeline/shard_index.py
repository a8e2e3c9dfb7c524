"""Per-shard member-offset index: random access into WebDataset tar shards without re-parsing them.

Why: a data order that is a function of (seed, epoch, position) alone (``data_pipeline.elastic``)
needs to fetch *sample i of shard s* directly. A tar stream has no table of contents, so each shard
gets one, listing every sample's key, the byte offset and length of its ``latent.npy`` payload, its
label and what (if anything) is wrong with it. With it, reading a sample is one ``pread``.

Where an index comes from:

* written by ``ShardWriter.close()`` (so every encode leaves indexed shards), or
* built once by scanning the shard (``load_index`` / ``python -m data_pipeline.index_shards DIR``)
  and cached: beside the shard as ``<shard>.index.json`` when the folder is writable, else under
  ``$DIT_SHARD_INDEX_CACHE`` or ``$XDG_CACHE_HOME/dit-data/shard-index`` (``~/.cache/...``).

A cached index is trusted only while it describes the same bytes: same file size and mtime, or
(after ``cp -r`` reset the mtimes) same size and same SHA-1 of the first and last 64 KiB. Anything
else is rescanned. The scan reads the whole shard and runs the same checks as ``safety``
(pickle-free npy parsing, allowed dtypes, NaN/Inf, strict ASCII labels), recording *problems*
that do not depend on the run's settings; shape, dtype and class-count checks against the manifest
happen when the index is used (``ShardIndex.usable``), so one index serves any reader.

A shard that breaks off (truncated mid-member, corrupt header, or ending without the tar
end-of-archive blocks, which is how a copy cut at a 512-byte boundary looks) keeps the samples
read before the break and records the reason in ``error``; ``complete`` is then False.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from .manifest import LABEL_FIELD, LATENT_FIELD, load_manifest, shard_urls, write_json_atomic
from .safety import ALLOWED_LATENT_DTYPES, LatentDecoder, SampleError, ShardError, decode_label, iter_tar_samples_at

__all__ = ["ShardIndex", "scan_shard", "load_index", "write_index", "index_path", "cache_index_path",
           "build_shard_set_indexes"]

log = logging.getLogger(__name__)
INDEX_VERSION = 1
INDEX_SUFFIX = ".index.json"
CACHE_ENV = "DIT_SHARD_INDEX_CACHE"
_FINGERPRINT_BYTES = 64 * 1024


@dataclass
class ShardIndex:
    """One shard's table of contents; arrays are per sample, in file order."""

    name: str  # shard file name, for messages
    size: int  # file size in bytes when indexed
    mtime_ns: int
    fingerprint: str  # sha1(size, first and last 64 KiB)
    complete: bool  # the archive ended with its end-of-archive blocks and nothing broke
    error: str | None  # why reading stopped early, if it did
    keys: list[str]
    offsets: np.ndarray  # (n,) int64: byte offset of the latent.npy payload, -1 if absent
    nbytes: np.ndarray  # (n,) int64: payload length
    labels: np.ndarray  # (n,) int64: parsed cls, -1 if absent or malformed
    formats: list[tuple[str, tuple[int, ...]]]  # distinct (dtype, shape) of parsed latents
    format_ids: np.ndarray  # (n,) int64: index into formats, -1 if no parsable latent
    problems: dict[int, str] = field(default_factory=dict)  # sample number -> reason it is unusable
    cut_key: str | None = None  # a sample whose members were all lost to the break, if any

    @property
    def num_entries(self) -> int:
        return len(self.keys)

    def usable(self, expected_shape=None, allowed_dtypes=ALLOWED_LATENT_DTYPES,
               num_classes: int | None = None) -> tuple[np.ndarray, dict[int, str]]:
        """(mask (n,) bool of samples a reader with these settings accepts, {sample number: reason} of the rest)."""
        allowed = {np.dtype(d).name for d in allowed_dtypes}
        shape = tuple(int(d) for d in expected_shape) if expected_shape is not None else None
        format_reason = []
        for dtype, fmt_shape in self.formats:
            if dtype not in allowed:
                format_reason.append(f"dtype {dtype} not allowed (expected one of {sorted(allowed)})")
            elif shape is not None and tuple(fmt_shape) != shape:
                format_reason.append(f"shape {tuple(fmt_shape)} != expected {shape}")
            else:
                format_reason.append(None)
        reasons = dict(self.problems)
        for i in np.flatnonzero(self.format_ids >= 0).tolist():
            if i not in reasons and format_reason[self.format_ids[i]] is not None:
                reasons[i] = format_reason[self.format_ids[i]]
        if num_classes:
            for i in np.flatnonzero(self.labels >= num_classes).tolist():
                reasons.setdefault(i, f"cls {int(self.labels[i])} out of range for {num_classes} classes")
        mask = np.ones(self.num_entries, bool)
        mask[list(reasons)] = False
        return mask, reasons

    def to_json(self) -> dict:
        return {
            "format": "dit-shard-index", "version": INDEX_VERSION, "shard": self.name, "size": self.size,
            "mtime_ns": self.mtime_ns, "fingerprint": self.fingerprint, "complete": self.complete,
            "error": self.error, "cut_key": self.cut_key,
            "formats": [[dtype, list(shape)] for dtype, shape in self.formats],
            "problems": {str(i): reason for i, reason in sorted(self.problems.items())},
            "samples": {"key": self.keys, "offset": self.offsets.tolist(), "nbytes": self.nbytes.tolist(),
                        "label": self.labels.tolist(), "format": self.format_ids.tolist()},
        }

    @classmethod
    def from_json(cls, payload: dict) -> "ShardIndex":
        if payload.get("format") != "dit-shard-index" or payload.get("version") != INDEX_VERSION:
            raise ValueError(f"not a version-{INDEX_VERSION} shard index")
        samples = payload["samples"]
        return cls(
            name=payload["shard"], size=int(payload["size"]), mtime_ns=int(payload["mtime_ns"]),
            fingerprint=payload["fingerprint"], complete=bool(payload["complete"]), error=payload["error"],
            keys=list(samples["key"]), offsets=np.asarray(samples["offset"], np.int64).reshape(-1),
            nbytes=np.asarray(samples["nbytes"], np.int64).reshape(-1),
            labels=np.asarray(samples["label"], np.int64).reshape(-1),
            formats=[(dtype, tuple(shape)) for dtype, shape in payload["formats"]],
            format_ids=np.asarray(samples["format"], np.int64).reshape(-1),
            problems={int(i): reason for i, reason in payload["problems"].items()}, cut_key=payload.get("cut_key"),
        )


def fingerprint(path: str, size: int) -> str:
    """Cheap identity of a shard's bytes that survives a copy (which resets mtime)."""
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            handle.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            digest.update(handle.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()


def scan_shard(path: str) -> ShardIndex:
    """Read a whole shard once and index it; never raises for bad content (it is recorded instead).

    Raises OSError only when the file cannot be opened at all (missing, permissions).
    """
    stat = os.stat(path)
    decoder = LatentDecoder(None, ALLOWED_LATENT_DTYPES)
    keys: list[str] = []
    offsets, nbytes, labels, format_ids = [], [], [], []
    formats: dict[tuple[str, tuple[int, ...]], int] = {}
    problems: dict[int, str] = {}
    error = cut_key = None
    last_key = None
    with open(path, "rb", buffering=1 << 20) as handle:
        try:
            for key, fields, where in iter_tar_samples_at(handle):
                last_key = key
                number = len(keys)
                keys.append(key)
                offset, length, label, fmt = -1, 0, -1, -1
                try:
                    if "__duplicate__" in fields:
                        raise SampleError(f"duplicate field {fields['__duplicate__'].decode()!r}")
                    for name in (LATENT_FIELD, LABEL_FIELD):
                        if name not in fields:
                            raise SampleError(f"missing field {name!r} (fields: {sorted(fields)})")
                    latent = decoder(fields[LATENT_FIELD])  # (C, H, W): header, dtype and NaN/Inf checks
                    offset, length = where[LATENT_FIELD], len(fields[LATENT_FIELD])
                    fmt = formats.setdefault((latent.dtype.name, tuple(latent.shape)), len(formats))
                    label = decode_label(fields[LABEL_FIELD], None)
                except SampleError as problem:
                    problems[number] = str(problem)
                offsets.append(offset)
                nbytes.append(length)
                labels.append(label)
                format_ids.append(fmt)
        except (ShardError, OSError) as broken:
            error = str(broken) if isinstance(broken, ShardError) else f"read error ({broken})"
            key = getattr(broken, "key", None)
            cut_key = key if key is not None and key != last_key else None
    return ShardIndex(
        name=os.path.basename(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns,
        fingerprint=fingerprint(path, stat.st_size), complete=error is None, error=error, keys=keys,
        offsets=np.asarray(offsets, np.int64), nbytes=np.asarray(nbytes, np.int64),
        labels=np.asarray(labels, np.int64), formats=list(formats), format_ids=np.asarray(format_ids, np.int64),
        problems=problems, cut_key=cut_key,
    )


def index_path(shard_path: str) -> str:
    return shard_path + INDEX_SUFFIX


def cache_index_path(shard_path: str) -> str:
    """Fallback location for shard folders this user cannot write to (keyed by the shard's real path)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dit-data", "shard-index")
    real = os.path.realpath(shard_path)
    return os.path.join(root, hashlib.sha1(real.encode()).hexdigest()[:16] + "-" + os.path.basename(real) + INDEX_SUFFIX)


def _matches(index: ShardIndex, path: str, stat: os.stat_result) -> bool:
    if index.size != stat.st_size:
        return False
    return index.mtime_ns == stat.st_mtime_ns or index.fingerprint == fingerprint(path, stat.st_size)


def _read_cached(candidate: str, shard_path: str, stat: os.stat_result) -> ShardIndex | None:
    try:
        with open(candidate) as handle:
            index = ShardIndex.from_json(json.load(handle))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignoring unreadable shard index %s (%s); rebuilding", candidate, error)
        return None
    return index if _matches(index, shard_path, stat) else None


def write_index(shard_path: str, index: ShardIndex) -> str | None:
    """Store ``index`` beside the shard, else in the user cache; returns where, or None if nowhere."""
    payload = index.to_json()
    for candidate in (index_path(shard_path), cache_index_path(shard_path)):
        try:
            write_json_atomic(candidate, payload)
            return candidate
        except OSError:
            continue
    log.warning("could not store the index of %s anywhere; it will be rebuilt next time", shard_path)
    return None


def load_index(shard_path: str, *, cache: bool = True) -> ShardIndex:
    """The index of ``shard_path``: a cached one that still matches the file, else a fresh scan (then cached).

    An index whose scan hit an I/O error is not cached (the error may be transient).
    Raises FileNotFoundError/OSError when the shard itself cannot be opened.
    """
    stat = os.stat(shard_path)
    for candidate in (index_path(shard_path), cache_index_path(shard_path)):
        index = _read_cached(candidate, shard_path, stat)
        if index is not None:
            return index
    index = scan_shard(shard_path)
    if cache and not (index.error or "").startswith("read error"):
        write_index(shard_path, index)
    return index


def build_shard_set_indexes(shard_set: str, *, part: int = 0, num_parts: int = 1) -> dict[str, ShardIndex | None]:
    """Index shards ``part::num_parts`` of a shard set (folder or manifest path); None for missing files.

    Lets N processes share the one-time build (each takes a slice, then a barrier) instead of N full scans.
    """
    manifest, directory = load_manifest(shard_set)
    out: dict[str, ShardIndex | None] = {}
    for url in shard_urls(manifest, directory)[part::num_parts]:
        try:
            out[url] = load_index(url)
        except FileNotFoundError:
            out[url] = None
    return out
