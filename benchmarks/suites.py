"""The benchmark suites, defined once for the benchmark scripts.

1-4 as in the shared datasets' README. 5: sneakers50 split by product (sorted ids: the first 25 vs the
last 25); anything learned (tuning) comes from the first half's catalog shots, and shopper photos of
the second half are searched against the second half's catalog shots, products tuning never saw.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", ROOT.parent / "shared" / "datasets")).resolve()
OUT = ROOT / "benchmarks" / "out"


@dataclass(frozen=True)
class Suite:
    name: str
    labels: Path
    root: Path
    label: str
    query: str | None
    gallery: str | None
    tune_on: str | None  # the rows a shop's catalog would hold, to learn from (closed or open set)


def sneakers50_halves() -> Path:
    """sneakers50's labels with absolute paths and a `half` column (1: first 25 products by id)."""
    with open(DATASETS / "sneakers50" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    products = sorted({r["product"] for r in rows})
    first = set(products[: len(products) // 2])
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "sneakers50_halves.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "half"])
        writer.writeheader()
        for r in rows:
            half = 1 if r["product"] in first else 2
            writer.writerow({**r, "file": str(DATASETS / "sneakers50" / r["file"]), "half": half})
    return path


def suites() -> dict[str, Suite]:
    s50 = DATASETS / "sneakers50"
    return {
        "1": Suite("1. sneakers50 shopper→catalog", s50 / "labels.csv", s50, "product", "scene=wild",
                   "scene=catalog", "scene=catalog"),
        "2": Suite("2. sneakers50 leave-one-out", s50 / "labels.csv", s50, "product", None, None, None),
        "3": Suite("3. mrstepup multi-view", DATASETS / "mrstepup_multiview" / "labels.csv",
                   DATASETS / "mrstepup_multiview", "product", "product!=", None, None),
        "4": Suite("4. fashion footwear type", DATASETS / "fashion_product_footwear" / "labels.csv",
                   DATASETS / "fashion_product_footwear", "articleType", None, None, None),
        "5": Suite("5. sneakers50 unseen products (shopper→catalog, 25 of 50)", sneakers50_halves(), Path("/"),
                   "product", "scene=wild&half=2", "scene=catalog&half=2", "scene=catalog&half=1"),
    }  # fmt: skip


def emit(out: dict, path: Path | None) -> None:
    """A benchmark's figures: printed, and written to `path` (--json) when given."""
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def main() -> None:
    """Suites 1-5 with the default pipeline, R@1 / R@10 / mAP@10 to four decimals: the figures a
    refactor must leave unchanged (issue 11, issue 24). `--store local` searches through a catalog
    (the records and the live index) instead of scoring every pair exactly, as eval does by default."""
    import argparse

    from lookalike.eval import evaluate

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--store", help="search through a catalog on this store (e.g. local)")
    ap.add_argument("--only", default="12345", help="which suites (default 12345)")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="pipeline option, as eval's")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    options = dict(o.split("=", 1) for o in args.config)
    out = {}
    for key, s in suites().items():
        if key in args.only:
            m = evaluate(s.labels, s.root, s.label, s.query, s.gallery, options, store=args.store).metrics
            out[s.name] = {k: round(m[k], 4) for k in ("recall@1", "recall@10", "mAP@10")}
    emit(out, args.json)


if __name__ == "__main__":
    main()
