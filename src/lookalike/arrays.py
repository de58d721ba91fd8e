"""Array helpers where NumPy's own are slow for what lookalike gives them: `np.unique` of NumPy 2.4
hashes integers (718 ms for 900,000 image ids, a 90% filter at a million images) where a sort does the
same in 17 ms (BENCHMARKS.md "Scale")."""

from __future__ import annotations

import numpy as np


def unique_ids(ids: np.ndarray) -> np.ndarray:
    """The distinct values of `ids`, sorted (np.unique's answer)."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    if len(ids) < 2:
        return ids
    keep = np.empty(len(ids), dtype=bool)
    keep[0] = True
    np.not_equal(ids[1:], ids[:-1], out=keep[1:])
    return ids[keep]
