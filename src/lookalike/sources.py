"""Catalog sources: a folder of images or a manifest (CSV, Parquet, JSONL) -> items to index.

Folder: a sub-folder's name is the product id (several images per product); an image lying
directly in the folder is its own product, named by its file stem. Manifest: columns
`product_id` and `image` (path, relative to the manifest, or URL; other names with `Columns`);
every other column (or those named) is product metadata, kept and returned with results.

Nothing here stops a run: a name that is not UTF-8, a symbolic link loop, a FIFO, a format Pillow
cannot open, an oversize or broken manifest row each become a `SourceProblem` naming it and why.
Rows sharing a product id are one product (see `_merge_duplicates` for the metadata rule).
"""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import features

from lookalike.errors import LookalikeError
from lookalike.feeds import FORMATS, read_feed, sniff
from lookalike.images import is_url, shorten
from lookalike.items import Item, SourceProblem

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
if features.check("avif"):
    IMAGE_SUFFIXES |= {".avif", ".avifs"}
# Image formats people keep in catalogs that this Pillow cannot read: said, not silently skipped.
UNSUPPORTED_SUFFIXES = {".heic", ".heif", ".jxl", ".svg", ".avif", ".avifs", ".dng", ".cr2", ".nef", ".arw"}
UNSUPPORTED_SUFFIXES -= IMAGE_SUFFIXES
MANIFEST_SUFFIXES = {".csv", ".parquet", ".jsonl", ".ndjson"}
FEED_SUFFIXES = {".tsv", ".txt", ".xml"}  # Merchant Center feeds (a CSV may be a Shopify export or a feed too)
MAX_FIELD_CHARS = 64 * 1024  # one manifest value; larger is a broken row, not metadata
csv.field_size_limit(16 * MAX_FIELD_CHARS)  # the csv module's own error stays a backstop


@dataclass(frozen=True)
class Columns:
    """Which manifest columns hold what, so a shop's own CSV works as it is
    (`index --id-column sku --image-column photo --metadata-column name ...`)."""

    product_id: str = "product_id"
    image: str = "image"
    metadata: tuple[str, ...] | None = None  # None: every other column
    # how the file is laid out: "auto" (from its header or XML namespace), "manifest", "merchant" (Google
    # Merchant Center TSV or XML) or "shopify" (a Shopify product export)
    format: str = "auto"

    def check(self, path: Path, names: list[str]) -> None:
        """Refuse, before anything is indexed, a manifest without the columns asked for."""
        wanted = [("--id-column", self.product_id), ("--image-column", self.image)]
        wanted += [("--metadata-column", m) for m in self.metadata or ()]
        for option, name in wanted:
            if name not in names:
                shown = ", ".join(repr(n) for n in names[:20]) + (" ..." if len(names) > 20 else "")
                raise LookalikeError(f"{path}: no column {name!r} (it has {shown}); name the right one with {option}")


def source_id(source: str | Path) -> str:
    """What identifies a source in the catalog (which products it owns): its resolved path."""
    return str(Path(source).resolve())


def iter_source(source: str | Path, columns: Columns | None = None) -> Iterator[Item | SourceProblem]:
    path = Path(source)
    if path.is_dir():
        yield from _iter_folder(path)
    elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES | FEED_SUFFIXES:
        columns = columns or Columns()
        if columns.format not in FORMATS:
            raise LookalikeError(f"unknown source format {columns.format!r} (known: {', '.join(FORMATS)})")
        layout = sniff(path) if columns.format == "auto" and path.suffix.lower() != ".parquet" else columns.format
        if layout in ("auto", "manifest") and path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise LookalikeError(f"{shorten(str(source))}: neither a Merchant Center feed (id, image_link) nor a"
                                 " manifest (.csv, .parquet, .jsonl): name its layout with --format")  # fmt: skip
        rows = _iter_manifest(path, columns) if layout in ("auto", "manifest") else read_feed(path, layout)
        yield from _merge_duplicates(rows)
    elif path.is_file():
        raise LookalikeError(
            f"{shorten(str(source))}: not a folder, a manifest (.csv, .parquet, .jsonl) nor a feed (.tsv, .txt, .xml)"
        )
    else:
        raise LookalikeError(f"{shorten(str(source))}: no such folder or manifest")


def _utf8(name: str) -> bool:
    """File names are bytes on Linux; one that is not UTF-8 cannot be stored or shown as text."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _iter_folder(root: Path) -> Iterator[Item | SourceProblem]:
    root = root.resolve()
    visited: set[tuple[int, int]] = set()

    def walk_error(e: OSError) -> None:
        problems.append(SourceProblem(shorten(str(e.filename)), f"folder cannot be read ({e.strerror})"))

    problems: list[SourceProblem] = []
    for folder, dirs, files in os.walk(root, followlinks=True, onerror=walk_error):
        yield from problems
        problems.clear()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in visited:  # a symbolic link back up the tree
            yield SourceProblem(shorten(folder), "symbolic link loop: folder already visited")
            dirs.clear()
            continue
        visited.add((st.st_dev, st.st_ino))
        for name in sorted(dirs):
            if name.startswith("."):
                dirs.remove(name)
            elif not _utf8(name):
                dirs.remove(name)
                yield SourceProblem(shorten(os.path.join(folder, name)), "folder name is not valid UTF-8: rename it")
        dirs.sort()
        for name in sorted(files):
            path = Path(folder, name)
            suffix = path.suffix.lower()
            if name.startswith(".") or (suffix not in IMAGE_SUFFIXES and suffix not in UNSUPPORTED_SUFFIXES):
                continue
            if not _utf8(str(path)):
                yield SourceProblem(shorten(str(path)), "file name is not valid UTF-8: rename it")
                continue
            if suffix in UNSUPPORTED_SUFFIXES:
                yield SourceProblem(str(path), f"{suffix} images cannot be read here: convert to JPEG or PNG")
                continue
            problem = _not_a_file(path)
            if problem:
                yield SourceProblem(str(path), problem)
                continue
            rel = path.relative_to(root)
            product_id = rel.parts[0] if len(rel.parts) > 1 else path.stem
            yield Item(product_id, str(path), {})
    yield from problems


def _not_a_file(path: Path) -> str | None:
    try:
        st = os.stat(path)
    except OSError as e:
        return "symbolic link loop" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror})"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file (device, FIFO or socket)"


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) pairs; a row that cannot be read is {"__error__": reason}."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            try:
                reader.fieldnames  # noqa: B018 - reads the header, so line numbers start right
            except csv.Error as e:
                raise LookalikeError(f"{path}: unreadable CSV header ({shorten(str(e), 100)})") from None
            line = reader.line_num
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    yield f"{path}:{line + 1}", {"__error__": f"unreadable CSV row ({shorten(str(e), 100)})"}
                else:
                    yield f"{path}:{line + 1}", row
                line = reader.line_num
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LookalikeError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        for n, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}:row {n}", row
    else:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    row = {"__error__": f"invalid JSON ({shorten(str(e), 100)})"}
                yield f"{path}:{n}", row if isinstance(row, dict) else {"__error__": "not a JSON object"}


def _row_problem(row: dict) -> str | None:
    if "__error__" in row:
        return row["__error__"]
    for key, value in row.items():
        text = value if isinstance(value, str) else None
        if text is not None and len(text) > MAX_FIELD_CHARS:
            return f"field {shorten(str(key), 60)!r} is {len(text)} characters, over the {MAX_FIELD_CHARS} limit"
        if (key is not None and not _utf8(str(key))) or (text is not None and not _utf8(text)):
            return "row is not valid UTF-8"
    if None in row:
        return "row has more fields than the header"
    return None


def manifest_rows(path: Path, columns: Columns) -> Iterator[tuple[str, Item] | SourceProblem]:
    """A manifest's rows one by one, as (where, item) or a problem, rows of one product not merged
    (labelled photos, `feedback import`); refused at once if it is not a manifest or lacks the columns."""
    if not path.is_file() or path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise LookalikeError(f"{shorten(str(path))}: no such manifest (.csv, .parquet, .jsonl)")
    return _iter_manifest(path, columns)


def _iter_manifest(path: Path, columns: Columns) -> Iterator[tuple[str, Item] | SourceProblem]:
    base = path.resolve().parent
    checked = False
    for where, row in _rows(path):
        problem = _row_problem(row)
        if problem:
            yield SourceProblem(where, problem)
            continue
        if not checked:  # the first readable row shows the columns (a CSV's header, JSONL's first object)
            columns.check(path, [str(k) for k in row])
            checked = True
        product_id, image = row.get(columns.product_id), row.get(columns.image)
        if product_id in (None, "") or image in (None, ""):
            yield SourceProblem(where, f"row needs both {columns.product_id} and {columns.image}")
            continue
        image = str(image)
        if not is_url(image) and "://" not in image:
            image = str((base / image).resolve())
        keep = columns.metadata
        metadata = {k: _plain(v) for k, v in row.items()
                    if k not in (columns.product_id, columns.image) and v not in (None, "")
                    and (keep is None or k in keep)}  # fmt: skip
        yield where, Item(str(product_id), image, metadata)


def _merge_duplicates(rows: Iterator[tuple[str, Item] | SourceProblem]) -> Iterator[Item | SourceProblem]:
    """Rows sharing a product id are one product with all their images: a layout (one row per image),
    not a mistake. Its metadata is the union of the rows'; where rows disagree on a key, the first
    row's value is kept and one short warning names the product, the keys and a few of the rows. A
    repeated (product, image) row is used once."""
    products: dict[str, list[tuple[str, Item]]] = {}
    for entry in rows:
        if isinstance(entry, SourceProblem):
            yield entry
        else:
            products.setdefault(entry[1].product_id, []).append(entry)
    for product_id, entries in products.items():
        merged: dict = {}
        conflicts: set[str] = set()
        disagreeing: list[str] = []
        for where, item in entries:
            differs = False
            for key, value in item.metadata.items():
                if key not in merged:
                    merged[key] = value
                elif merged[key] != value:
                    conflicts.add(key)
                    differs = True
            if differs:
                disagreeing.append(where.rsplit(":", 1)[-1])
        if conflicts:
            shown = ("lines " if all(w.isdigit() for w in disagreeing) else "") + ", ".join(disagreeing[:3])
            shown += f" and {len(disagreeing) - 3} more" if len(disagreeing) > 3 else ""
            keys = ", ".join(sorted(conflicts)[:5])
            yield SourceProblem(
                entries[0][0], f"product {shorten(product_id, 100)!r}: {len(disagreeing)} of its {len(entries)} rows "
                f"disagree with its first on {keys} ({shown}): the first row's value is kept", warning=True,
            )  # fmt: skip
        seen: set[str] = set()
        for where, item in entries:
            if item.image in seen:
                yield SourceProblem(where, f"image listed twice for product {shorten(product_id, 100)!r}: used once",
                                    warning=True)  # fmt: skip
                continue
            seen.add(item.image)
            yield replace(item, metadata=merged)


def _plain(value: object) -> object:
    """JSON-safe metadata values (Parquet can hold dates, decimals...)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
