"""Near-identical photos grouped: connected components of "scores at least a threshold" (union-find).

Used where copies of one photo must count once: the searches report's gallery of unanswered searches,
and the split of benchmark suite F (a photo and its copy never on both sides)."""

from __future__ import annotations

import numpy as np


def near_groups(vectors: np.ndarray, threshold: float) -> list[list[int]]:
    """Rows of unit `vectors` grouped when linked by cosine >= threshold (directly or through others),
    each group in row order, groups in the order of their first row."""
    parent = list(range(len(vectors)))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    if len(vectors):
        near = np.triu(vectors @ vectors.T >= threshold, 1)
        for a, b in zip(*np.nonzero(near), strict=True):
            ra, rb = root(int(a)), root(int(b))
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for m in range(len(vectors)):
        groups.setdefault(root(m), []).append(m)
    return list(groups.values())
