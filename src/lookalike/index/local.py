"""The embedded index: FAISS in memory, exact (flat inner product) for small catalogs and HNSW above
`hnsw_threshold` vectors, saved as `index-<tag>.faiss` beside the database so a large catalog opens
without rebuilding its graph."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np


class LocalIndex:
    def __init__(self, directory: Path, dim: int, expected: int, tag: str | None, hnsw_threshold: int = 20_000,
                 hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 256):  # fmt: skip
        self.directory = Path(directory)
        self.ef_search = ef_search
        self._deleted = np.zeros(0, dtype=np.int64)  # HNSW cannot delete: these ids are filtered out
        self.index = self._load(tag, dim) if tag is not None else None
        if self.index is None:
            if self.kind_for(expected, hnsw_threshold) == "hnsw":
                inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                inner.hnsw.efConstruction = ef_construction
                inner.hnsw.efSearch = ef_search
            else:
                inner = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIDMap2(inner)
        self.hnsw = isinstance(faiss.downcast_index(self.index.index), faiss.IndexHNSW)
        self.kind = "hnsw" if self.hnsw else "exact"

    @staticmethod
    def kind_for(expected: int, hnsw_threshold: int = 20_000, **_) -> str:
        return "hnsw" if expected >= hnsw_threshold else "exact"

    def _path(self, tag: str) -> Path:
        return self.directory / f"index-{tag}.faiss"

    def _load(self, tag: str, dim: int) -> faiss.Index | None:
        path = self._path(tag)
        if not path.exists():
            return None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
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
            self._deleted = np.union1d(self._deleted, ids)
        else:
            self.index.remove_ids(ids)

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

    def save(self, tag: str) -> None:
        """Only an HNSW graph is worth a file (a flat index rebuilds in milliseconds from SQLite)."""
        target = self._path(tag)
        for old in self.directory.glob("index-*.faiss"):
            if old != target:
                old.unlink(missing_ok=True)
        if not self.hnsw or len(self._deleted) or target.exists():
            return
        tmp = target.with_suffix(".tmp")
        faiss.write_index(self.index, str(tmp))
        tmp.replace(target)

    def close(self) -> None:
        self.index = None
