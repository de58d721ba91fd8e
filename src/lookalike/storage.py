"""A catalog directory's storage, opened as one: its records (`records.py`, the source of truth), the
live index that follows them (`live_index.py`) and the filters over them (`filters.py`).

Only what needs more than one of them is here: opening (which store the vectors live in), a search
(filters -> the index -> the records' rows), swapping every vector at once, closing. Everything else is
asked of the part that holds it: `storage.records.add(...)`, `storage.live.flush()`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lookalike.errors import LookalikeError
from lookalike.filters import Filters
from lookalike.index import store_backend
from lookalike.live_index import LiveIndex
from lookalike.records import Hit, Records


class Storage:
    def __init__(self, directory: Path | str, store: str | None = None, **index_options):
        """`store`: where the vectors are searched (`local`, `milvus:///path/lite.db`, `milvus://host:19530`);
        None = the one the catalog recorded ("local" for a new one)."""
        if store is not None:
            store_backend(store)  # a malformed store is refused before anything is made
        self.records = records = Records(directory)
        self.directory = records.directory
        recorded = records.get_meta("index")
        if recorded and store and store != recorded:
            records.close()
            raise LookalikeError(
                f"{self.directory} keeps its vectors in {recorded!r}, not {store!r} (move them with "
                f"`lookalike store migrate --catalog {self.directory} --to {store}`)"
            )
        if not recorded:
            records.set_meta("index", store or "local")
        self.live = LiveIndex(records, recorded or store or "local", **index_options)
        self.filters = Filters(records)
        records.after_write.append(self.live.catch_up)  # a write returns once it is searchable

    def search(self, vector: np.ndarray, k: int, where: dict[str, str] | None = None) -> list[Hit]:
        """Top-k images for a query vector (as embedded), optionally only of products whose metadata
        match every filter of `where`."""
        allowed = (lambda version: self.filters.allowed(where, version)) if where else None
        with self.live.searching():  # the rows too: a writer's next catch-up step waits for them
            return self.records.hits(self.live.search(vector, k, allowed))

    def sample_vectors(self, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
        """Up to n images' vectors as the index holds them (mapped) and their products."""
        vectors, products = self.records.sample_vectors(n, seed)
        return (self.live.mapped(vectors) if len(vectors) else vectors), products

    def replace_vectors(self, vectors: dict[tuple[str, str], tuple[np.ndarray, str, dict | None]],
                        meta: dict[str, str]) -> None:  # fmt: skip
        """Every image's vector swapped in one transaction (`Records.replace_vectors`); the index,
        which follows by position, is built again."""
        self.records.replace_vectors(vectors, meta)
        self.live.drop()

    def discard(self) -> None:
        """Close, deleting what the store holds for this catalog (a scratch catalog, e.g. eval's)."""
        self.live.discard()
        self.records.close()

    def close(self) -> None:
        """Close, saving the index's snapshot first."""
        self.live.close()
        self.records.close()
