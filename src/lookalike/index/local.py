"""The embedded index: exact search (FAISS flat inner product, in memory) for small catalogs, and from
`large_from` vectors the compact IVF index (`compact.py`: ~200 bytes an image in memory, the vectors
on disk), or HNSW (`large="hnsw"`: faster to query, ~5 KB an image, rebuilt after deletes) on request."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np

from lookalike.errors import LookalikeError
from lookalike.index.compact import CompactIndex

LARGE = ("compact", "hnsw")


def kind_for(expected: int, large_from: int = 20_000, large: str = "compact", **_) -> str:
    if large not in LARGE:
        raise LookalikeError(f"index option large={large!r}: expected one of {', '.join(LARGE)}")
    if expected < large_from:
        return "exact"
    return CompactIndex.kind if large == "compact" else "hnsw"


def local(directory: Path, dim: int, expected: int, tag: str | None, large_from: int = 20_000,
          large: str = "compact", **options):  # fmt: skip
    """The local backend's index for `expected` vectors (an index kind is chosen when it is opened)."""
    kind = kind_for(expected, large_from, large)
    if kind == CompactIndex.kind:
        return CompactIndex(directory, dim, expected, tag, **options)
    return FlatIndex(directory, dim, tag, hnsw=kind == "hnsw", **options)


local.kind_for = kind_for


class FlatIndex:
    """FAISS in memory: flat (exact) or HNSW; only an HNSW graph is saved (`index-<tag>.faiss`)."""

    def __init__(self, directory: Path, dim: int, tag: str | None, hnsw: bool = False, hnsw_m: int = 32,
                 ef_construction: int = 80, ef_search: int = 256, **_):  # fmt: skip
        self.directory = Path(directory)
        self.ef_search = ef_search
        self._deleted = np.zeros(0, dtype=np.int64)  # HNSW cannot delete: these ids are filtered out
        self.restored = None
        self.index = self._load(tag, dim) if tag is not None and hnsw else None
        if self.index is None:
            if hnsw:
                inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                inner.hnsw.efConstruction = ef_construction
                inner.hnsw.efSearch = ef_search
            else:
                inner = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIDMap2(inner)
        self.hnsw = hnsw
        self.kind = "hnsw" if hnsw else "exact"

    def _path(self, tag: str) -> Path:
        return self.directory / f"index-{tag}.faiss"

    def _load(self, tag: str, dim: int) -> faiss.Index | None:
        path, note = self._path(tag), self._path(tag).with_suffix(".json")
        if not path.exists() or not note.exists():
            return None
        try:
            index = faiss.read_index(str(path))
            self.restored = json.loads(note.read_text())
        except (RuntimeError, ValueError):
            path.unlink(missing_ok=True)
            return None
        return index if index.d == dim else None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids):
            return
        # building a graph is worth every core; one query at a time is faster on one OpenMP thread, and
        # idle OpenMP threads spin against ONNX Runtime's on small machines (12.7 -> 2.5 ms per search)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        try:
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        finally:
            faiss.omp_set_num_threads(1)

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        if self.hnsw:  # tombstones until the next rebuild from SQLite, instead of a rebuild per delete
            self._deleted = np.union1d(self._deleted, np.intersect1d(ids, self._all_ids()))
        else:
            self.index.remove_ids(ids)

    def _all_ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map)

    def count(self) -> int:
        return int(self.index.ntotal) - len(self._deleted)

    def search(self, vector: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if self.count() == 0 or k <= 0:
            return empty
        selector = None
        if allowed is not None:
            allowed = np.setdiff1d(allowed, self._deleted) if len(self._deleted) else allowed
            if not len(allowed):
                return empty
            selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
        elif len(self._deleted):
            deleted = faiss.IDSelectorBatch(self._deleted)  # kept referenced: FAISS holds a bare pointer
            selector = faiss.IDSelectorNot(deleted)
        if self.hnsw:
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
            if selector is not None:
                params.sel = selector
        else:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
        faiss.omp_set_num_threads(1)
        scores, ids = self.index.search(np.atleast_2d(vector).astype(np.float32), min(k, self.count()), params=params)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), scores[0][keep]

    def save(self, tag: str, note: dict) -> None:
        """Only an HNSW graph is worth a file (a flat index rebuilds in milliseconds from SQLite); not
        one with tombstones (they would come back: the note says they were applied)."""
        target = self._path(tag)
        for old in [*self.directory.glob("index-*.faiss"), *self.directory.glob("index-*.json")]:
            if old.stem != target.stem:
                old.unlink(missing_ok=True)
        if not self.hnsw or len(self._deleted):
            return
        tmp = target.with_suffix(".tmp")
        faiss.write_index(self.index, str(tmp))
        tmp.replace(target)
        target.with_suffix(".json").write_text(json.dumps(note))

    def drop(self) -> None:
        for path in self.directory.glob("index-*"):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.index = None
