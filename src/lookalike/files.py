"""Files written so that a crash or a power loss leaves the whole new file or none of it: uploads and
the compact index's snapshots."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_synced(path: Path, data: bytes) -> None:
    """A new file (a name nothing reads yet), on disk when this returns."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_array(path: Path, array: np.ndarray) -> str:
    """np.save, on disk when this returns; the file's name (what a manifest records)."""
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    return path.name


def sync(path: Path) -> None:
    """Flush a file another library wrote (FAISS's write_index) to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def replace_atomically(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """Write beside, sync, rename over `path`, sync the folder: readers see the old file or the new."""
    tmp = tmp or path.with_suffix(".tmp")
    write_synced(tmp, data)
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
