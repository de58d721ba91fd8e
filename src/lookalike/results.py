"""What the pipeline answers: the Python API returns these, `--json` prints them and the REST API answers
and documents them (FastAPI reads the dataclasses as they are): one set of response models."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lookalike.detect import Box


@dataclass
class Match:
    product_id: str
    score: float
    image: str
    metadata: dict[str, Any]

    def to_dict(self) -> dict:
        return {"product_id": self.product_id, "score": round(self.score, 6), "image": self.image,
                "metadata": self.metadata}  # fmt: skip

    def shown(self, key: str) -> str:
        """A metadata value as people read it: a list (a feed's colours) as "Red/White"."""
        value = self.metadata.get(key, "")
        return "/".join(map(str, value)) if isinstance(value, list) else str(value)


@dataclass
class QueryInfo:
    boxes: list[Box]
    box_used: Box | None
    crop: str
    took_ms: float

    def to_dict(self) -> dict:
        return {
            "boxes": [b.to_dict() for b in self.boxes],
            "box_used": self.box_used.to_dict() if self.box_used else None,
            "crop": self.crop,
            "took_ms": round(self.took_ms, 2),
        }


@dataclass
class SearchResult:
    query: QueryInfo
    results: list[Match]
    # no product came close enough (the best image scored under the catalog's `threshold`, see
    # `calibration.py`): `results` is then empty rather than noise
    no_match: bool = False
    threshold: float | None = None
    # the search log's id for this search (feedback names it), None when the log is off
    search_id: str | None = None

    def to_dict(self) -> dict:
        return {"query": self.query.to_dict(), "no_match": self.no_match, "search_id": self.search_id,
                "threshold": None if self.threshold is None else round(self.threshold, 4),
                "results": [m.to_dict() for m in self.results]}  # fmt: skip


@dataclass
class IndexReport:
    """What an index run did (or, with dry_run, would do). `failed` inputs were skipped; `warnings`
    were used but not exactly as written; `pruned` are the images dropped because their source no
    longer lists them."""

    source: str = ""
    dry_run: bool = False
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    pruned: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    crops: dict[str, int] = field(default_factory=dict)
    # URL downloads: requests made, bytes downloaded, answers "not modified" (304), tries repeated
    downloads: dict[str, int] = field(default_factory=dict)

    @property
    def processed(self) -> int:
        return self.added + self.updated

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed"] = [{"image": w, "reason": r} for w, r in self.failed]
        d["warnings"] = [{"where": w, "message": m} for w, m in self.warnings]
        d["pruned"] = [{"product_id": p, "image": i} for p, i in self.pruned]
        return d
