"""The "no close match" threshold, learned from the catalog's own vectors (never from queries): a
query whose best product scores no higher than two unrelated products of this catalog typically do
is not a photo of anything the shop sells (a room, a plain image, a photo with no shoe).

The threshold is the `level` quantile of the scores between random pairs of images of *different*
products (the median: a query no closer to anything than half of all unrelated pairs are to each
other). The level was chosen on sneakers50 products 1-25 (the highest that keeps 95% of their
shopper photos' correct answers) and checked on products 26-50 (BENCHMARKS.md "No close match").

A small catalog has few pairs of products, and its median says more about which products it happens
to hold than about unrelated photos: at 5 or 10 products the median kept only 91-94% of the right
answers. Below `FULL_LEVEL_FROM` products the level is lowered by 0.1 at each halving (0.4 at 10
products, 0.3 at 5), chosen on subsets of products 1-25 and checked on subsets of 26-50
(`benchmarks/no_match.py`: at least 96.5% kept at 5, 10, 20 and 50 products)."""

from __future__ import annotations

import numpy as np

NO_MATCH_LEVEL = 0.5
FULL_LEVEL_FROM = 20  # products; fewer: a lower level (`level_for`)
PAIRS = 20_000  # random pairs: the quantile is stable to ~0.002 at this size
MIN_PRODUCTS = 5  # fewer products: no threshold (every query gets its answers)


def level_for(products: int, level: float = NO_MATCH_LEVEL) -> float:
    """The quantile level for a catalog of this many products: `level` from FULL_LEVEL_FROM products,
    0.1 lower at each halving below that."""
    if products >= FULL_LEVEL_FROM:
        return level
    return max(0.0, level - 0.1 * float(np.log2(FULL_LEVEL_FROM / max(products, 1))))


def no_match_score(vectors: np.ndarray, labels: list[str], level: float = NO_MATCH_LEVEL, pairs: int = PAIRS,
                   seed: int = 0, by_size: bool = True) -> float | None:  # fmt: skip
    """The threshold for this catalog, or None when it has too few products to say. `by_size`: the
    level lowered for a small catalog (`level_for`)."""
    labels = np.asarray(labels)
    products = len(set(labels.tolist()))
    if products < MIN_PRODUCTS:
        return None
    if by_size:
        level = level_for(products, level)
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(vectors), pairs), rng.integers(0, len(vectors), pairs)
    keep = labels[a] != labels[b]
    scores = np.einsum("ij,ij->i", vectors[a[keep]], vectors[b[keep]])
    return float(np.quantile(scores, level))
