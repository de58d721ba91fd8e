"""How a product's score comes from its images' scores: the best image, or the mean of its top n.

A catalog has several photos per product; one lucky photo can outrank a product whose photos all look
alike the query. `mean2` averages a product's two best matches (a product with one photo keeps its one
score). Search and eval both rank with this, so what eval measures is what search does.
"""

from __future__ import annotations

import numpy as np

from lookalike.errors import LookalikeError

RANKS = ("best", "mean2", "mean3")


def check_rank(rank: str) -> int:
    """How many of a product's best image scores are averaged."""
    if rank not in RANKS:
        raise LookalikeError(f"rank {rank!r}: expected one of {', '.join(RANKS)}")
    return 1 if rank == "best" else int(rank[4:])


def product_score(scores: list[float], rank: str) -> float:
    """`scores`: one product's image scores, best first."""
    n = check_rank(rank)
    return float(np.mean(scores[:n]))


def rank_labels(sim: np.ndarray, labels: list[str], rank: str) -> tuple[np.ndarray, list[str]]:
    """[queries, gallery images] similarities -> [queries, distinct labels] product scores (-inf where a
    label has no comparable image), and the labels in column order."""
    n = check_rank(rank)
    names = sorted(set(labels))
    column = {name: i for i, name in enumerate(names)}
    out = np.full((sim.shape[0], len(names)), -np.inf, dtype=np.float64)
    groups: dict[int, list[int]] = {}
    for j, label in enumerate(labels):
        groups.setdefault(column[label], []).append(j)
    for c, idx in groups.items():
        part = np.sort(sim[:, idx], axis=1)[:, ::-1][:, :n]  # best first; -inf (excluded) sorts last
        finite = np.isfinite(part)
        total = np.where(finite, part, 0).sum(axis=1)
        count = finite.sum(axis=1)
        out[:, c] = np.where(count > 0, total / np.maximum(count, 1), -np.inf)
    return out, names
