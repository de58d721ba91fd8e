"""The vector store interface the pipeline talks to.

One catalog = products (id + metadata) and their images (key, content hash, vector, crop).
The embedded default is `LocalStore` (SQLite + FAISS); a server-backed store implements the same
methods and the pipeline does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class ImageRecord:
    product_id: str
    image: str
    sha256: str
    vector: np.ndarray | None  # None only in a dry run's plan
    crop: str = "whole"
    box: dict | None = None
    metadata: dict = field(default_factory=dict)  # the product's
    source: str | None = None  # what added it: a source's id (folder or manifest path) or "api"


@dataclass(frozen=True)
class Hit:
    """One catalog image matching a query."""

    product_id: str
    image: str
    score: float
    crop: str
    box: dict | None


class Store(Protocol):
    dim: int | None

    def add(self, records: list[ImageRecord], replace_products: list[str] = ()) -> list[str]:
        """Insert or replace images (by product_id + image), atomically for the batch; with
        replace_products, those products' other images are dropped in the same transaction
        (returned, so files kept for them can be deleted)."""

    def remove(self, images: list[tuple[str, str]] = (), products: list[str] = ()) -> list[str]:
        """Drop images by (product_id, image) and whole products; returns the images removed."""

    def claim(self, images: list[tuple[str, str]], source: str) -> None:
        """Record which source owns these images."""

    def images_in_use(self, images: list[str]) -> set[str]:
        """Those of these images some product still has."""

    def search(self, vector: np.ndarray, k: int, where: dict[str, str] | None = None) -> list[Hit]:
        """Top-k images by cosine similarity, optionally only of products whose metadata match."""

    def count(self) -> tuple[int, int]:
        """(products, images)."""

    def known(self) -> dict[tuple[str, str], tuple[str, str | None]]:
        """(product_id, image) -> (content sha256, owning source) of everything stored: what incremental
        indexing skips, and what one source may prune."""

    def products(self, ids: list[str]) -> dict[str, dict]:
        """Metadata of these products."""

    def set_products(self, metadata: dict[str, dict]) -> None:
        """Replace product metadata without touching vectors."""

    def product(self, product_id: str) -> tuple[dict, list[str]] | None:
        """A product's metadata and images (in the order added), consistent with each other; None if absent."""

    def metadata_values(self, limit: int = 50) -> dict[str, list[str]]:
        """Distinct metadata values per key (filter menus)."""

    def sample(self, n: int) -> list[tuple[str, str]]:
        """A few (product_id, image) pairs spread over the catalog."""

    def index_kind(self) -> str:
        """How vectors are searched, e.g. "exact" or "hnsw"."""

    def flush(self) -> None:
        """Persist whatever makes the next open fast; data is already durable."""

    def vectors(self) -> np.ndarray:
        """Every stored vector, as added (what a learned projection is fitted on)."""

    def set_projection(self, projection) -> None:
        """A learned projection (e.g. embed.Whitening) applied to stored and query vectors; None clears it."""

    def search_dim(self) -> int | None:
        """Size of the vectors searched (after any projection)."""

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def close(self) -> None: ...
