"""Atomic small-file writes: write a temporary file beside the target, fsync, rename over it.

A reader (a resuming job, the status command on a login node) sees the old file or the new one,
never a torn one, even when the writer is killed mid-write.
"""
from __future__ import annotations

import os


def atomic_write_text(path: str, text: str, *, fsync: bool = True) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
