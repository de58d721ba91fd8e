"""Make docs/app.png: the web app after an upload, on the CC0 `clothing_small_shoes` photos only
(the other datasets may not be redistributed, so they never appear in the repository).

    bin/python docs/screenshot.py                  # docs/app.png
    bin/python docs/screenshot.py --street OUT.png # a worn-shoe street photo of sneakers50 searched
                                                   # against its catalog shots; OUT outside the repo
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import DATASETS, dataset_path, sneakers_split  # noqa: E402
from test_app_browser import screenshot_search  # noqa: E402

from lookalike import Catalog  # noqa: E402
from lookalike.sources import Item  # noqa: E402


def cc0() -> tuple[Path, list[Item]]:
    base = DATASETS / "clothing_small_shoes"
    with open(base / "labels.csv", newline="") as f:
        files = [base / r["file"] for r in csv.DictReader(f)]
    return files[0], [Item(p.stem[:8], str(p)) for p in files[1:]]


def street(catalog: Path) -> Path:
    """A shopper photo (worn, in the street) whose product the catalog ranks first."""
    gallery, probe = sneakers_split()
    with Catalog.open(catalog, create=True) as cat:
        cat.index([Item(r["product"], str(dataset_path("sneakers50", r))) for r in gallery])
        for r in probe:
            found = cat.search(dataset_path("sneakers50", r), k=1).results
            if found and found[0].product_id == r["product"]:
                return dataset_path("sneakers50", r)
    raise SystemExit("no street photo found its product first")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--street", metavar="OUT.png", help="a sneakers50 street photo instead (not redistributable)")
    args = p.parse_args()
    out = ROOT / "docs" / "app.png"
    if args.street:
        out = Path(args.street).resolve()
        if out.is_relative_to(ROOT):
            raise SystemExit(f"{out}: sneakers50 photos may not be redistributed; write outside the repository")
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "cat"
        if args.street:
            query = street(catalog)
        else:
            query, items = cc0()
            with Catalog.open(catalog, create=True) as cat:
                cat.index(items)
        screenshot_search(catalog, query, out, Path(tmp) / "app.log")
    print(out)


if __name__ == "__main__":
    main()
