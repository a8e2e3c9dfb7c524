"""Atomic, deterministic writing of one WebDataset shard.

A shard is written under a temporary name and renamed into place only when complete, so an
interrupted encode job never leaves a half shard that a rerun would mistake for a finished one.
Member headers use fixed mtime/uid/gid so the same inputs give byte-identical shards.
Closing a shard also writes its member-offset index (``data_pipeline.shard_index``) beside it, so
the elastic loader can read any sample by offset without a first pass over freshly encoded data.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np

from .manifest import LABEL_FIELD, LATENT_FIELD
from .safety import ShardError, encode_label, encode_latent
from .shard_index import load_index, scan_shard, write_index


class ShardWriter:
    def __init__(self, path: str):
        self.path = path
        self.temp_path = f"{path}.tmp-{os.getpid()}"
        self.num_samples = 0
        self._keys: set[str] = set()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(self.temp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, latent: np.ndarray, label: int) -> None:
        """latent: (C, H, W) float16/float32; key must be unique and dot-free (WebDataset splits at dots)."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.path}")
        if latent.ndim != 3:
            raise ValueError(f"latent must be (C, H, W), got shape {latent.shape}")
        self._keys.add(key)
        self._add_member(f"{key}.{LATENT_FIELD}", encode_latent(latent))
        self._add_member(f"{key}.{LABEL_FIELD}", encode_label(label))
        self.num_samples += 1

    def close(self, *, index: bool = True) -> None:
        """Finish the archive, flush it to disk, publish it under its final name, then index it.

        The index is made by scanning the file just written (still in the page cache), so it is
        byte-for-byte what a later ``load_index`` would build: one code path, no second format.
        """
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp_path, self.path)
        if index:
            write_index(self.path, scan_shard(self.path))

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            if os.path.exists(self.temp_path):
                os.unlink(self.temp_path)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def count_shard_samples(path: str) -> int:
    """Samples of a finished shard (a resumed encode job needs counts for its manifest).

    Uses (and, for shards written before indexes existed, builds and caches) the shard's index.
    Raises ShardError for a shard that is cut short, so a rerun re-encodes it instead of
    publishing a manifest that silently lacks its tail.
    """
    index = load_index(path)
    if not index.complete:
        raise ShardError(f"{path}: {index.error} after {index.num_entries} samples")
    return index.num_entries
