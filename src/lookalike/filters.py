"""Filters: a search's `where` (metadata key -> a value, or a range LOW..HIGH) -> the image ids allowed.

They read `image_terms`, which the records keep in the same transaction as products and images (one
row per image and metadata key; numbers also as REAL), so a filter is a few index lookups, not a scan
of the products' JSON. What a filter allowed, and the values offered in filter menus, are cached until
the next write.
"""

from __future__ import annotations

import re

import numpy as np

from lookalike.arrays import unique_ids
from lookalike.records import Records

# a filter value "LOW..HIGH" (either side may be left out) is a numeric range, both ends included
_RANGE = re.compile(r"^\s*(-?[0-9.]+(?:[eE][+-]?[0-9]+)?)?\s*\.\.\s*(-?[0-9.]+(?:[eE][+-]?[0-9]+)?)?\s*$")
CACHED = 32  # distinct filters remembered per version of the records
# metadata that is free text, not a choice: no filter menu (a feed's title, a manifest's name, links)
FREE_TEXT = {"name", "title", "description", "link", "url", "productdisplayname", "image_link"}
FREE_TEXT_LENGTH = 40  # values this long on average are text, whatever the key's name


def terms(where: dict[str, str]) -> tuple[list[str], list]:
    """One SELECT of image ids per filter (text without case; a range on the number), and its parameters."""
    selects, params = [], []
    for name, value in where.items():
        bounds = _RANGE.match(str(value))
        if bounds and any(bounds.groups()):
            low, high = (float(b) if b else None for b in bounds.groups())
            sql = "SELECT image_id FROM image_terms WHERE key = ? AND num IS NOT NULL"
            sql += (" AND num >= ?" if low is not None else "") + (" AND num <= ?" if high is not None else "")
            selects.append(sql)
            params += [str(name), *(b for b in (low, high) if b is not None)]
        else:
            selects.append("SELECT image_id FROM image_terms WHERE key = ? AND value = ?")
            params += [str(name), str(value)]
    return selects, params


class Filters:
    def __init__(self, records: Records):
        self.records = records
        self._allowed: dict[tuple, np.ndarray] = {}
        self._values: tuple = (None, {})

    def allowed(self, where: dict[str, str], version: int) -> np.ndarray:
        """Image ids whose product matches every filter, as of the records' `version`: one string back
        from SQLite (10,000 ids as rows cost more than the lookups), parsed by NumPy (900,000 ids: 20 ms,
        against 170 ms split in Python)."""
        key = (version, tuple(sorted((str(k), str(v)) for k, v in where.items())))
        if key in self._allowed:
            return self._allowed[key]
        selects, params = terms(where)
        ((text,),) = self.records.query(f"SELECT group_concat(image_id) FROM ({' INTERSECT '.join(selects)})", params)
        ids = unique_ids(np.fromstring(text, dtype=np.int64, sep=",")) if text else np.zeros(0, dtype=np.int64)
        if len(self._allowed) >= CACHED:
            self._allowed.clear()
        self._allowed[key] = ids
        return ids

    def values(self, limit: int = 50) -> dict[str, list[str] | tuple[float, float]]:
        """The filter menus: per metadata key, its distinct values (a choice; an empty list for a key with
        more than `limit` values or of free text: names, titles, descriptions, links), or for a key whose
        every value is a number, its (lowest, highest) (a range, e.g. a price)."""
        key = (self.records.data_version(), limit)
        if self._values[0] != key:
            menus: dict[str, list[str] | tuple[float, float]] = {}
            listed = []
            for k, distinct, texts, low, high, length in self.records.query(
                "SELECT key, COUNT(DISTINCT value), SUM(num IS NULL), MIN(num), MAX(num), AVG(LENGTH(value)) "
                "FROM image_terms GROUP BY key ORDER BY key"
            ):
                if not texts and distinct > 1:
                    menus[k] = (low, high)
                elif distinct <= limit and k.lower() not in FREE_TEXT and length <= FREE_TEXT_LENGTH:
                    listed.append(k)
                else:
                    menus[k] = []
            if listed:
                marks = ",".join("?" * len(listed))
                for k, v in self.records.query(
                    f"SELECT key, value FROM image_terms WHERE key IN ({marks}) GROUP BY key, value ORDER BY 1, 2",
                    listed,
                ):
                    menus.setdefault(k, []).append(v)
            self._values = key, dict(sorted(menus.items()))
        return self._values[1]
