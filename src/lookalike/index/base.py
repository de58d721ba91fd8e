"""The interface every vector index backend implements, FiftyOne-style: vectors by integer id, nothing
else. Records, metadata and the source of truth stay in SQLite (`records.py`); a backend can always be
rebuilt from it, so it only adds, removes and searches."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from lookalike.errors import LookalikeError

# name -> "module:factory"; the factory takes (directory, dim, expected, tag, **options), and for a
# store given with an address (`milvus://host:19530`) address=that spec
BACKENDS = {"local": "lookalike.index.local:local", "milvus": "lookalike.index.milvus:milvus"}
SCHEMES = {"milvus": "milvus", "milvuss": "milvus"}  # an address's scheme -> its backend


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

    def drop(self) -> None:
        """Delete everything this backend keeps for the catalog (after a migration to another store)."""

    def close(self) -> None: ...


def store_backend(spec: str) -> tuple[str, dict]:
    """A store as the user names it (`local`, `milvus:///path/lite.db`, `milvus://host:19530`) ->
    its backend's name and the options that say where it is. Refuses a malformed one, by name."""
    if "://" in spec:
        scheme = spec.split("://", 1)[0]
        if scheme not in SCHEMES:
            raise LookalikeError(f"store {spec!r}: unknown scheme {scheme!r} (expected local or milvus://...)")
        check = getattr(importlib.import_module(BACKENDS[SCHEMES[scheme]].split(":")[0]), "address", None)
        if check is not None:
            check(spec)  # a malformed address fails here, before anything is written
        return SCHEMES[scheme], {"address": spec}
    if spec not in BACKENDS or spec in SCHEMES:
        named = ", ".join(b for b in BACKENDS if b not in SCHEMES)
        raise LookalikeError(f"store {spec!r}: expected {named}, milvus:///path/to/lite.db or milvus://host:19530")
    return spec, {}


def open_index(spec: str, directory: Path, dim: int, expected: int, tag: str | None, **options) -> VectorIndex:
    """The store `spec`'s index, for `expected` vectors of size `dim`. It may come back holding the
    snapshot it saved under `tag` (None: start empty), `restored` then being that snapshot's note."""
    name, where = store_backend(spec)
    return backend(name)(directory, dim, expected, tag, **options, **where)


def kind_of(spec: str, expected: int, **options) -> str:
    """How store `spec` would search `expected` vectors, without building anything (`lookalike info`,
    a server's health check): its backend's optional `kind_for`, else its name."""
    name, where = store_backend(spec)
    kind_for = getattr(backend(name), "kind_for", None)
    return kind_for(expected, **options, **where) if kind_for else name


def backend(name: str) -> type:
    if name not in BACKENDS:
        raise LookalikeError(f"index backend {name!r}: expected one of {', '.join(BACKENDS)}")
    module, factory = BACKENDS[name].split(":")
    try:
        cls = getattr(importlib.import_module(module), factory)
    except ImportError as e:
        raise LookalikeError(f"the {name} index backend needs {e.name}: pip install 'lookalike[{name}]'") from None
    return cls
