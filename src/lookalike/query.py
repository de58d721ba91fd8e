"""A query: a photo -> boxes -> crop -> vector -> the index -> ranked products.

The same encoder path as indexing (`encoder.py`), so a query and the catalog's photos are embedded
alike; products are ranked over their images' scores (`ranking.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from lookalike.boxes import BoxChoice
from lookalike.calibration import no_match_score
from lookalike.encoder import Encoder, Query
from lookalike.errors import LookalikeError
from lookalike.images import ImageInput
from lookalike.projection import Projection
from lookalike.ranking import check_rank, product_score
from lookalike.results import Match, QueryInfo, SearchResult
from lookalike.storage import Storage

DEFAULT_RANK = "best"  # chosen on the benchmark suites (BENCHMARKS.md)


class Searcher:
    """Searches one catalog's store with the query encoder it is handed (the catalog swaps it after
    tuning; see `Catalog._follow`)."""

    def __init__(self, store: Storage, projection: Projection, encoder: Callable[[], Encoder]):
        self.store, self.projection, self.encoder = store, projection, encoder
        self._threshold: tuple[tuple, float | None] = ((), None)

    def threshold(self) -> float | None:
        """This catalog's no-match threshold (`calibration.py`), learned again when the catalog grew or
        shrank by a fifth or its vectors' space changed (a projection, tuning)."""
        images = self.store.live.count()
        key = (int(np.log(max(images, 1)) / np.log(1.2)), self.projection.version, self.store.records.dim)
        if self._threshold[0] != key:
            vectors, labels = self.store.sample_vectors(5000)
            self._threshold = key, no_match_score(vectors, labels) if len(vectors) else None
        return self._threshold[1]

    def fetch(self, source: ImageInput) -> bytes:
        return self.encoder().photo(source).data

    def load(self, image: ImageInput | Image.Image) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        return self.encoder().load(image)

    def detect(self, image: ImageInput | Image.Image | Query) -> Query:
        if isinstance(image, Query):
            return image
        img = self.load(image)
        return Query(img, self.encoder().detect(img))

    def embed(self, image: ImageInput | Image.Image) -> np.ndarray:
        return self.encoder().encode(self.load(image)).vector

    def search(self, image: ImageInput | Image.Image | Query, k: int, where: dict[str, str] | None,
               box: BoxChoice | None, rank: str, min_score: float | None = None,
               collapse: str | None = None) -> SearchResult:  # fmt: skip
        """`min_score`: keep the products scoring at least this, whatever the no-match threshold says
        (`no_match` is still reported); None: the threshold decides (all results, or none). `collapse`:
        a metadata key; only the best product of each of its values is kept."""
        t0 = time.perf_counter()
        query = self.detect(image)
        img, boxes = query.image, query.boxes
        box = box or BoxChoice()
        if not isinstance(box, BoxChoice):
            raise LookalikeError(f"box must be a BoxChoice (BoxChoice.parse('0'), .whole(), .manual(...)), not {box!r}")
        out = self.encoder().encode(img, box=box.resolve(boxes, img), boxes=boxes, whole=box.kind == "whole")
        matches, best = self._ranked(out.vector, k, where, rank, collapse)
        threshold = self.threshold()
        no_match = threshold is not None and best is not None and best < threshold
        if min_score is not None:
            matches = [m for m in matches if m.score >= min_score]
        elif no_match:
            matches = []
        info = QueryInfo(boxes, out.crop.box, out.crop.path, (time.perf_counter() - t0) * 1000)
        return SearchResult(info, matches, no_match, threshold)

    def similar(self, product_id: str, k: int, where: dict[str, str] | None, rank: str) -> SearchResult:
        """More like this: the products nearest a catalog product, searched with the mean of its stored
        vectors (no photo, no re-embedding); the product itself is left out."""
        t0 = time.perf_counter()
        vectors = self.store.records.product_vectors(product_id)
        if not len(vectors):
            raise LookalikeError(f"no product {product_id!r} in the catalog")
        mean = vectors.mean(axis=0)
        vector = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
        matches = [m for m in self.search_vector(vector, k + 1, where, rank) if m.product_id != product_id][:k]
        info = QueryInfo([], None, f"product {product_id}", (time.perf_counter() - t0) * 1000)
        return SearchResult(info, matches)

    def duplicates(self, threshold: float, progress: Callable[[int, int], None] | None) -> list[dict]:
        """Each image's nearest neighbours of other products at `threshold` or more, as the index
        scores them; the best pair per two products, highest first."""
        best: dict[tuple[str, str], dict] = {}
        records = self.store.records
        total = records.count()[1]
        for n, (product_id, image, vector) in enumerate(records.each_image(), 1):
            for hit in self.store.search(vector, 5):
                if hit.product_id == product_id or hit.score < threshold:
                    continue
                (a, ia), (b, ib) = sorted([(product_id, image), (hit.product_id, hit.image)])
                if hit.score > best.get((a, b), {}).get("score", -1.0):
                    best[(a, b)] = {"products": [a, b], "images": [ia, ib], "score": round(hit.score, 4)}
            if progress and (n % 500 == 0 or n == total):
                progress(n, total)
        return sorted(best.values(), key=lambda d: (-d["score"], d["products"]))

    def search_vector(self, vector: np.ndarray, k: int, where: dict[str, str] | None, rank: str) -> list[Match]:
        """Products ranked by a score over their images; each match shows its best image. The index is
        asked for more images until k products are found (or the catalog has no more)."""
        return self._ranked(vector, k, where, rank)[0]

    def _ranked(self, vector: np.ndarray, k: int, where: dict[str, str] | None, rank: str,
                collapse: str | None = None) -> tuple[list[Match], float | None]:  # fmt: skip
        """search_vector's matches, and the best image's score (None when nothing was found). With
        `collapse`, products sharing that metadata key's value (the variants of one model) count once:
        the best of them stands for all, as search engines collapse on a field; a product without the
        key stands for itself."""
        if k < 1:
            raise LookalikeError(f"k must be at least 1 (got {k})")
        check_rank(rank)
        n = max(4 * k, 32)
        while True:
            hits = self.store.search(vector, n, where)  # the store maps it like its live index
            groups: dict[str, list] = {}
            for h in hits:
                groups.setdefault(h.product_id, []).append(h)
            scored = sorted(((product_score([h.score for h in g], rank), g[0]) for g in groups.values()),
                            key=lambda pair: -pair[0])  # fmt: skip
            if collapse:  # every candidate's key is needed to tell the groups apart
                scored = _collapsed(scored, self.store.records.products(list(groups)), collapse)
            if len(scored) >= k or len(hits) < n:
                break
            n *= 4
        metadata = self.store.records.products([h.product_id for _, h in scored[:k]])  # once, for the shown
        best = max((h.score for h in hits), default=None)
        return [Match(h.product_id, score, h.image, metadata.get(h.product_id, {})) for score, h in scored[:k]], best


def _collapsed(scored: list[tuple], metadata: dict[str, dict], key: str) -> list[tuple]:
    """The first (best) product of each value of metadata `key`; products without it each stand alone."""
    seen, kept = set(), []
    for score, hit in scored:
        value = metadata.get(hit.product_id, {}).get(key)
        group = ("value", str(value)) if value not in (None, "") else ("product", hit.product_id)
        if group not in seen:
            seen.add(group)
            kept.append((score, hit))
    return kept
