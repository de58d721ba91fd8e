"""Feedback import: labelled shopper photos from anywhere (review photos, support tickets) -> the log.

A manifest (CSV, JSONL, Parquet) with a photo (path or URL) and the product it shows per row, and
optionally the box around the shoe (`x1,y1,x2,y2` in pixels of the upright photo). Each row is checked
(the product must be in the catalog, the photo must load, the box must lie inside it) and kept in the
search log's photo folder as feedback of kind "label"; a bad row is reported by its line and skipped,
as `index` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lookalike.boxes import BoxChoice
from lookalike.errors import LookalikeError
from lookalike.search_log import SearchLog
from lookalike.sources import Columns, SourceProblem, manifest_rows


@dataclass
class FeedbackReport:
    source: str
    imported: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    def to_dict(self) -> dict:
        return {"source": self.source, "imported": self.imported,
                "failed": [{"where": w, "reason": r} for w, r in self.failed]}  # fmt: skip


def parse_box(value: object, img: Image.Image) -> tuple[float, float, float, float] | None:
    """A row's box: blank for none, else x1,y1,x2,y2 in pixels inside the photo (as `search --box`)."""
    if value in (None, ""):
        return None
    text = ",".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
    if len(text.split(",")) != 4:
        raise LookalikeError(f"box {text!r}: expected x1,y1,x2,y2 in pixels")
    choice = BoxChoice.parse(text)
    box = choice.resolve([], img)
    return (box.x1, box.y1, box.x2, box.y2)


def import_labelled(path: Path, columns: Columns, log: SearchLog, load: Callable[[str], Image.Image],
                    products: Callable[[list[str]], dict], progress: Callable[[int, int | None], None] | None = None,
                    ) -> FeedbackReport:  # fmt: skip
    """Every good row of the manifest kept as a labelled shopper photo; bad rows reported and skipped."""
    report = FeedbackReport(str(path))
    rows = list(manifest_rows(path, columns))
    known = products(sorted({r[1].product_id for r in rows if not isinstance(r, SourceProblem)}))
    for n, row in enumerate(rows, 1):
        if isinstance(row, SourceProblem):
            report.failed.append((row.where, row.reason))
            continue
        where, item = row
        try:
            if item.product_id not in known:
                raise LookalikeError(f"no product {item.product_id!r} in the catalog")
            img = load(item.image)
            box = parse_box(item.metadata.get("box"), img)
            log.label(img, item.product_id, box, origin=where)
            report.imported += 1
        except LookalikeError as e:
            report.failed.append((where, str(e)))
        if progress:
            progress(n, len(rows))
    return report
