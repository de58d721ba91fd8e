"""Make docs/app.png: the web app after an upload, on the CC0 `clothing_small_shoes` photos only
(the other datasets may not be redistributed, so they never appear in the repository).

    bin/python docs/screenshot.py
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import DATASETS  # noqa: E402
from test_app_browser import screenshot_search  # noqa: E402

from lookalike import Catalog  # noqa: E402
from lookalike.sources import Item  # noqa: E402


def main() -> None:
    base = DATASETS / "clothing_small_shoes"
    with open(base / "labels.csv", newline="") as f:
        files = [base / r["file"] for r in csv.DictReader(f)]
    query, gallery = files[0], files[1:]
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "cat"
        with Catalog.open(catalog, create=True) as cat:
            cat.index([Item(p.stem[:8], str(p)) for p in gallery])
        screenshot_search(catalog, query, ROOT / "docs" / "app.png", Path(tmp) / "app.log")
    print(ROOT / "docs" / "app.png")


if __name__ == "__main__":
    main()
