"""Checkpoint integrity: a size and an xxh3-128 checksum per file in ``COMPLETE.json``, and the checks on them.

Why xxh3-128: it hashes at memory speed (it ships with DeepSpeed's dependencies), so checking a checkpoint costs
about one read of it; it detects bit rot and torn or overwritten files, not tampering (this is not a signature).
The hashing is split over the ranks that wrote the checkpoint (``assign``), at save and at resume.

Torch-free, so ``python -m trainer.status --verify`` can check a checkpoint on a login node.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from trainer.rundir import CHECKPOINT_COMPLETE

HASH_NAME = "xxh3_128"
CHUNK = 8 << 20


def file_digest(path: str) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def list_files(root: str) -> dict:
    """relative path -> size for every file under ``root`` except the completion marker."""
    sizes = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel != CHECKPOINT_COMPLETE:
                sizes[rel] = os.path.getsize(full)
    return dict(sorted(sizes.items()))


def assign(sizes: dict, world: int) -> list[list[str]]:
    """Files per rank, largest first onto the least-loaded rank: every rank reads about the same bytes."""
    shares: list[list[str]] = [[] for _ in range(max(1, world))]
    load = [0] * len(shares)
    for rel, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        r = load.index(min(load))
        shares[r].append(rel)
        load[r] += size
    return shares


def read_manifest(path: str) -> tuple[Optional[dict], Optional[str]]:
    """(rel -> {"size", "xxh3_128"?}, None) or (None, why it is unusable). Old markers hold sizes only."""
    marker = os.path.join(path, CHECKPOINT_COMPLETE)
    if not os.path.isfile(marker):
        return None, f"{path} has no {CHECKPOINT_COMPLETE} (save did not finish)"
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
        return {rel: v if isinstance(v, dict) else {"size": int(v)} for rel, v in files.items()}, None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{marker} is unreadable: {exc}"


def check_sizes(path: str) -> Optional[str]:
    """None when every recorded file is present with its recorded size (cheap: no data read)."""
    files, problem = read_manifest(path)
    if problem:
        return problem
    for rel, meta in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        actual = os.path.getsize(full)
        if actual != meta["size"]:
            return f"{full} has {actual} bytes, expected {meta['size']} (truncated or overwritten)"
    return None


def check_hashes(path: str, rels: Optional[list] = None) -> list[str]:
    """Problems found re-hashing ``rels`` (default: all recorded files) of a checkpoint whose sizes are right."""
    files, problem = read_manifest(path)
    if problem:
        return [problem]
    problems = []
    for rel in (sorted(files) if rels is None else rels):
        meta = files[rel]
        expected = meta.get(HASH_NAME)
        if expected is None:
            continue  # written before checksums existed: sizes only
        actual = file_digest(os.path.join(path, rel))
        if actual != expected:
            problems.append(f"{os.path.join(path, rel)} has {HASH_NAME} {actual}, COMPLETE.json records {expected} "
                            "(changed after it was written: bit rot or an overwrite)")
    return problems


def has_checksums(path: str) -> bool:
    files, _ = read_manifest(path)
    return bool(files) and all(HASH_NAME in meta for meta in files.values())


def seal(path: str) -> None:
    """Hash every file under ``path`` and write its manifest: what a derived folder (a layout conversion, an edited
    copy) needs to be verified like a checkpoint the trainer wrote."""
    sizes = list_files(path)
    write_manifest(path, sizes, {rel: file_digest(os.path.join(path, rel)) for rel in sizes})


def is_intact(path: str) -> bool:
    """``path`` exists and every file has its recorded size and hash."""
    return os.path.isdir(path) and check_sizes(path) is None and not check_hashes(path)


def write_manifest(path: str, sizes: dict, digests: dict) -> None:
    from trainer.rundir import atomic_write_text

    files = {rel: {"size": size, HASH_NAME: digests[rel]} for rel, size in sizes.items()}
    atomic_write_text(os.path.join(path, CHECKPOINT_COMPLETE), json.dumps({"version": 2, "hash": HASH_NAME,
                                                                         "files": files}, indent=1))
