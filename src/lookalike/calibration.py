"""The "no close match" threshold, learned from the catalog's own vectors (never from queries): a
query whose best product scores no higher than two unrelated products of this catalog typically do
is not a photo of anything the shop sells (a room, a plain image, a photo with no shoe).

The threshold is the `level` quantile of the scores between random pairs of images of *different*
products (the median: a query no closer to anything than half of all unrelated pairs are to each
other). The level was chosen on sneakers50 products 1-25 (the highest that keeps 95% of their
shopper photos' correct answers) and checked on products 26-50 (BENCHMARKS.md "No close match")."""

from __future__ import annotations

import numpy as np

NO_MATCH_LEVEL = 0.5
PAIRS = 20_000  # random pairs: the quantile is stable to ~0.002 at this size
MIN_PRODUCTS = 5  # fewer products: no threshold (every query gets its answers)


def no_match_score(vectors: np.ndarray, labels: list[str], level: float = NO_MATCH_LEVEL, pairs: int = PAIRS,
                   seed: int = 0) -> float | None:  # fmt: skip
    """The threshold for this catalog, or None when it has too few products to say."""
    labels = np.asarray(labels)
    if len(set(labels.tolist())) < MIN_PRODUCTS:
        return None
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(vectors), pairs), rng.integers(0, len(vectors), pairs)
    keep = labels[a] != labels[b]
    scores = np.einsum("ij,ij->i", vectors[a[keep]], vectors[b[keep]])
    return float(np.quantile(scores, level))
