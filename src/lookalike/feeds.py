"""Product feeds as shops publish them -> one item per image, the feed's attributes as metadata.

- Google Merchant Center: tab-separated text, or XML (RSS 2.0 or Atom with the `g:` namespace). An
  item is a product: `id`, `image_link` and up to 10 `additional_image_link` (comma-separated in text,
  a repeated element in XML); `item_group_id` ties the variants of one model (`search --collapse`).
  Items without an id or an image, or with an id over the spec's 50 characters, are reported and skipped.
- Shopify's product CSV export: a product starts at each new handle; further rows of it are variants or
  carry only an image; a variant's own image is an image of the product. Both generations of column
  names (`Handle`/`URL handle`, `Image Src`/`Product image URL`, `Variant SKU`/`SKU`, ...) are read.
  Draft and archived products are reported and not indexed.

`price` becomes a number and `currency` its code, so `--where price=50..100` works.
"""

from __future__ import annotations

import csv
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.items import Item, SourceProblem

G = "http://base.google.com/ns/1.0"
ATOM = "http://www.w3.org/2005/Atom"
FORMATS = ("auto", "manifest", "merchant", "shopify")
MERCHANT_KEYS = ("title", "link", "brand", "color", "gender", "product_type", "item_group_id", "availability")
MAX_ID = 50  # Merchant Center's limit on an item id
SHOPIFY = {  # what we read -> its names in the older and the newer exports (lower case)
    "handle": ("handle", "url handle"),
    "image": ("image src", "product image url"),
    "position": ("image position",),
    "variant_image": ("variant image", "variant image url"),
    "status": ("status",),
    "title": ("title",),
    "brand": ("vendor",),
    "product_type": ("type",),
    "price": ("variant price", "price"),
}
Row = tuple[str, Item] | SourceProblem


def sniff(path: Path) -> str:
    """Which layout a file has, from its header or XML namespace: merchant, shopify or manifest."""
    if path.suffix.lower() == ".xml":
        return "merchant"
    header = _header(path)
    if {"id", "image_link"} <= header:
        return "merchant"
    if any(n in header for n in SHOPIFY["handle"]) and any(n in header for n in SHOPIFY["image"]):
        return "shopify"
    return "manifest"


def _header(path: Path) -> set[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            first = f.readline()
    except OSError:
        return set()
    names = first.rstrip("\r\n").split("\t") if "\t" in first else next(csv.reader([first]), [])
    return {n.strip().lower() for n in names}


def read_feed(path: Path, layout: str) -> Iterator[Row]:
    if layout == "merchant":
        return _merchant_xml(path) if path.suffix.lower() == ".xml" else _merchant_text(path)
    if layout == "shopify":
        return _shopify(path)
    raise LookalikeError(f"unknown feed format {layout!r} (known: {', '.join(FORMATS)})")


# -- Merchant Center ---------------------------------------------------------------------------
def price(text: str) -> tuple[float, str | None] | None:
    """'15.00 USD' (or 'USD 15.00', '1,299.00 EUR', '15,00 EUR') -> (15.0, 'USD'); None if no number."""
    m = re.search(r"-?\d[\d.,\s]*", text or "")
    if not m:
        return None
    number = re.sub(r"\s", "", m.group()).rstrip(".,")
    if "," in number and "." in number:  # the last separator is the decimal one
        number = number.replace(",", "") if number.rfind(".") > number.rfind(",") else \
            number.replace(".", "").replace(",", ".")  # fmt: skip
    elif "," in number:
        number = number.replace(",", ".") if re.search(r",\d{1,2}$", number) else number.replace(",", "")
    try:
        value = float(number)
    except ValueError:
        return None
    code = re.search(r"\b[A-Za-z]{3}\b", text.replace(m.group(), " "))
    return value, code.group().upper() if code else None


def image_links(value: str) -> list[str]:
    """additional_image_link in a text feed: URLs separated by commas; a URL's own commas are written
    %2C or the URL is quoted."""
    parts = re.split(r",\s*(?=[\"']?\s*https?://)", value or "")
    return [u for u in (p.strip().strip("\"'").strip() for p in parts) if u]


def colours(values: Iterable[str]) -> str | list[str]:
    """A product's colours: one as text, several as a list (Merchant Center's "Red/Blue", a Shopify
    product's Color option values), so that a filter `color=red` matches each of them ("" if none)."""
    kept = list(dict.fromkeys(v.strip() for v in values if v.strip()))
    return kept[0] if len(kept) == 1 else kept or ""


def _merchant_item(where: str, fields: dict[str, list[str]]) -> Iterator[Row]:
    one = {k: (v[0].strip() if v else "") for k, v in fields.items()}
    item_id = one.get("id", "")
    if not item_id:
        yield SourceProblem(where, "item has no id (Merchant Center requires one)")
        return
    if len(item_id) > MAX_ID:
        yield SourceProblem(where, f"id is {len(item_id)} characters, over Merchant Center's {MAX_ID}")
        return
    if not one.get("image_link"):
        yield SourceProblem(where, f"item {item_id!r} has no image_link")
        return
    metadata: dict = {k: one[k] for k in MERCHANT_KEYS if one.get(k)}
    if "availability" in metadata:
        metadata["availability"] = metadata["availability"].lower().replace(" ", "_")
    if "color" in metadata:
        metadata["color"] = colours(metadata["color"].split("/"))
        if not metadata["color"]:
            del metadata["color"]
    if parsed := price(one.get("price", "")):
        metadata["price"] = parsed[0]
        if parsed[1]:
            metadata["currency"] = parsed[1]
    images = [one["image_link"]]
    for value in fields.get("additional_image_link", []):
        images += image_links(value)
    for image in dict.fromkeys(images):
        yield where, Item(item_id, image, metadata)


def _merchant_text(path: Path) -> Iterator[Row]:
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.strip().lower() for h in next(reader, [])]
        for n, values in enumerate(reader, 2):
            if not any(v.strip() for v in values):
                continue
            fields: dict[str, list[str]] = {}
            for name, value in zip(header, values, strict=False):
                fields.setdefault(name, []).append(value.strip().strip('"'))
            yield from _merchant_item(f"{path}:{n}", fields)


def _merchant_xml(path: Path) -> Iterator[Row]:
    """Items of an RSS 2.0 (`channel/item`) or Atom (`entry`) feed, read as a stream."""
    with open(path, "rb") as f:
        prolog = f.read(4096)
    if b"<!DOCTYPE" in prolog or b"<!ENTITY" in prolog:  # entity expansion is how an XML file attacks its reader
        raise LookalikeError(f"{path}: XML with a DOCTYPE is refused (a Merchant Center feed has none)")
    n = 0
    try:
        for _, elem in ET.iterparse(path, events=("end",)):
            if elem.tag not in ("item", f"{{{ATOM}}}entry"):
                continue
            n += 1
            fields: dict[str, list[str]] = {}
            for child in elem:
                namespace, _, name = child.tag.rpartition("}")
                text = (child.text or "").strip() or child.get("href", "")
                if namespace.lstrip("{") == G or name not in fields:  # g:id wins over Atom's own id
                    key = name if namespace.lstrip("{") == G else f"~{name}"
                    fields.setdefault(key, []).append(text)
            merged = {k: v for k, v in fields.items() if not k.startswith("~")}
            for key, value in fields.items():  # plain RSS/Atom title and link where no g: one is given
                if key.startswith("~") and key[1:] in ("title", "link") and key[1:] not in merged:
                    merged[key[1:]] = value
            yield from _merchant_item(f"{path}:item {n}", merged)
            elem.clear()
    except ET.ParseError as e:
        yield SourceProblem(str(path), f"XML stops being readable after item {n} ({e})")
    if n == 0:
        raise LookalikeError(f"{path}: no <item> or <entry> elements: not a Merchant Center feed")


# -- Shopify -----------------------------------------------------------------------------------
def _shopify(path: Path) -> Iterator[Row]:
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        names = {n.strip().lower(): n for n in reader.fieldnames or []}
        column = {key: next((names[a] for a in aliases if a in names), None) for key, aliases in SHOPIFY.items()}
        options = [(names[f"option{i} name"], names[f"option{i} value"]) for i in (1, 2, 3)
                   if f"option{i} name" in names and f"option{i} value" in names]  # fmt: skip
        products: dict[str, dict] = {}
        for n, row in enumerate(reader, 2):
            handle = (row.get(column["handle"]) or "").strip()
            if not handle:
                yield SourceProblem(f"{path}:{n}", "row has no handle")
                continue
            p = products.get(handle)
            if p is None:  # a product's first row carries its fields
                p = products[handle] = {"line": n, "images": [], "colours": {}, "option": {}, "fields": row}
            for key in ("image", "variant_image"):
                value = (row.get(column[key]) or "").strip() if column[key] else ""
                if value:
                    position = (row.get(column["position"]) or "").strip() if key == "image" else ""
                    p["images"].append((int(position) if position.isdigit() else 10**6, len(p["images"]), value))
            for name_col, value_col in options:
                name = (row.get(name_col) or "").strip().lower() or p["option"].get(name_col, "")
                p["option"][name_col] = name
                if name in ("color", "colour") and (value := (row.get(value_col) or "").strip()):
                    p["colours"][value] = None
    hidden = []
    for handle, p in products.items():
        first = p["fields"]
        status = (first.get(column["status"]) or "").strip().lower() if column["status"] else ""
        if status in ("draft", "archived"):
            hidden.append(f"{handle} ({status})")
            continue
        if not p["images"]:
            yield SourceProblem(f"{path}:{p['line']}", f"product {handle!r} has no image")
            continue
        metadata: dict = {k: v for k in ("title", "brand", "product_type")
                          if column[k] and (v := (first.get(column[k]) or "").strip())}  # fmt: skip
        if column["price"] and (parsed := price(first.get(column["price"]) or "")):
            metadata["price"] = parsed[0]
        if p["colours"]:
            metadata["color"] = colours(p["colours"])
        if status:
            metadata["status"] = status
        for _, _, image in sorted(p["images"]):
            yield f"{path}:{p['line']}", Item(handle, image, metadata)
    if hidden:
        shown = ", ".join(hidden[:5]) + (f" and {len(hidden) - 5} more" if len(hidden) > 5 else "")
        yield SourceProblem(str(path), f"{len(hidden)} draft or archived product(s) not indexed: {shown}", warning=True)
