"""Catalog sources: a folder of images or a manifest (CSV, Parquet, JSONL) -> items to index.

Folder: a sub-folder's name is the product id (several images per product); an image lying
directly in the folder is its own product, named by its file stem. Manifest: columns
`product_id` and `image` (path, relative to the manifest, or URL); every other column is
product metadata, kept and returned with results.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.images import is_url

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST_SUFFIXES = {".csv", ".parquet", ".jsonl", ".ndjson"}


@dataclass(frozen=True)
class Item:
    product_id: str
    image: str  # absolute path or URL
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SourceProblem:
    """A row or file that can't become an item; reported, never fatal."""

    where: str
    reason: str


def iter_source(source: str | Path) -> Iterator[Item | SourceProblem]:
    path = Path(source)
    if path.is_dir():
        yield from _iter_folder(path)
    elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        yield from _iter_manifest(path)
    elif path.is_file():
        raise LookalikeError(f"{source}: not a folder nor a manifest (.csv, .parquet, .jsonl)")
    else:
        raise LookalikeError(f"{source}: no such folder or manifest")


def _iter_folder(root: Path) -> Iterator[Item]:
    root = root.resolve()
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        rel = path.relative_to(root)
        product_id = rel.parts[0] if len(rel.parts) > 1 else path.stem
        yield Item(product_id, str(path), {})


def _rows(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield from csv.DictReader(f)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        row = {"__error__": f"line {n}: invalid JSON ({e})"}
                    yield row if isinstance(row, dict) else {"__error__": f"line {n}: not a JSON object"}


def _iter_manifest(path: Path) -> Iterator[Item | SourceProblem]:
    base = path.resolve().parent
    for n, row in enumerate(_rows(path), 1):
        where = f"{path}:{n}"
        if "__error__" in row:
            yield SourceProblem(f"{path}", row["__error__"])
            continue
        product_id, image = row.get("product_id"), row.get("image")
        if product_id in (None, "") or image in (None, ""):
            yield SourceProblem(where, "row needs both product_id and image")
            continue
        image = str(image)
        if not is_url(image) and "://" not in image:
            image = str((base / image).resolve())
        metadata = {k: _plain(v) for k, v in row.items() if k not in ("product_id", "image") and v not in (None, "")}
        yield Item(str(product_id), image, metadata)


def _plain(value: object) -> object:
    """JSON-safe metadata values (Parquet can hold dates, decimals...)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
