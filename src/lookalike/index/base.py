"""The interface every vector index backend implements, FiftyOne-style: vectors by integer id, nothing
else. Records, metadata and the source of truth stay in SQLite (`catalog.py`); a backend can always be
rebuilt from it, so it only adds, removes and searches."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from lookalike.errors import LookalikeError

# name -> "module:factory"; the factory takes (directory, dim, expected, tag, **options)
BACKENDS = {"local": "lookalike.index.local:local"}


class VectorIndex(Protocol):
    kind: str  # how it searches, e.g. "exact" or "ivf-pq": shown by `lookalike info`
    # the note passed to `save` with the snapshot it came back holding, None when it started empty:
    # the catalog catches it up with what was written after that note
    restored: dict | None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert unit vectors under int64 ids (ids are never reused)."""

    def remove(self, ids: np.ndarray) -> None:
        """Forget these ids; unknown ones are ignored."""

    def search(self, vector: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, inner products) of the k nearest, best first; `allowed`: only among these ids."""

    def count(self) -> int:
        """Vectors searchable now."""

    def save(self, tag: str, note: dict) -> None:
        """Persist a snapshot for a fast next open under this tag (the vectors' space: a snapshot of
        another one is never used), with the caller's note; may do nothing."""

    def close(self) -> None: ...


def open_index(name: str, directory: Path, dim: int, expected: int, tag: str | None, **options) -> VectorIndex:
    """The backend `name`, for `expected` vectors of size `dim`. It may come back holding the snapshot
    it saved under `tag` (None: start empty), `restored` then being that snapshot's note."""
    return backend(name)(directory, dim, expected, tag, **options)


def kind_of(name: str, expected: int, **options) -> str:
    """How backend `name` would search `expected` vectors, without building anything (`lookalike info`,
    a server's health check): its optional `kind_for`, else its name."""
    kind_for = getattr(backend(name), "kind_for", None)
    return kind_for(expected, **options) if kind_for else name


def backend(name: str) -> type:
    if name not in BACKENDS:
        raise LookalikeError(f"index backend {name!r}: expected one of {', '.join(BACKENDS)}")
    module, factory = BACKENDS[name].split(":")
    try:
        cls = getattr(importlib.import_module(module), factory)
    except ImportError as e:
        raise LookalikeError(f"the {name} index backend needs {e.name}: pip install 'lookalike[{name}]'") from None
    return cls
