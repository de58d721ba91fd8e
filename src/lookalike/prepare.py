"""One source item's work, the same here and on Ray's actors (`cluster.py`): the photo read and
hashed, skipped when unchanged, else detected, cropped and embedded into the record to store. It lives
below both `indexing` and `cluster`, which each run it over many items."""

from __future__ import annotations

from pathlib import Path

from lookalike.encoder import Encoder
from lookalike.images import ImageSource, Photo
from lookalike.records import ImageRecord
from lookalike.sources import Item


def record(encoder: Encoder, photo: Photo, product_id: str, key: str, metadata: dict, source: str) -> ImageRecord:
    """A photo's record: its vector and the crop it came from."""
    out = encoder.encode(encoder.image(photo))
    box = out.crop.box.to_dict() if out.crop.box else None
    return ImageRecord(product_id, key, photo.sha256, out.vector, out.crop.path, box, metadata, source)


def absolute(image: str | ImageSource) -> str:
    """A path made absolute now, so what is stored never depends on the working directory."""
    if isinstance(image, ImageSource):
        return image.value if image.kind == "url" else str(Path(image.value).resolve())
    return image if "://" in image else str(Path(image).resolve())  # another scheme fails when read


def prepare(encoder: Encoder, item: Item, known: dict, source: str, embed: bool = True,
            photo: Photo | None = None) -> ImageRecord | None:  # fmt: skip
    """The record to store (without a vector when not embedding), or None when the image is unchanged.
    `photo`: the item's image already read (by the fetch pool), else it is read here."""
    photo = photo or encoder.photo(item.image)
    if known.get((item.product_id, item.image), (None,))[0] == photo.sha256:
        return None
    if not embed:
        encoder.image(photo)  # a dry run still finds the images that would fail
        return ImageRecord(item.product_id, item.image, photo.sha256, None, "dry-run", None, item.metadata, source)
    return record(encoder, photo, item.product_id, item.image, item.metadata, source)
