"""What a source yields: an item (a product's image, with the product's metadata) or a problem (a row or
file that cannot become one, reported, never fatal). Folders, manifests and feeds all speak it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    product_id: str
    image: str  # absolute path or URL
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SourceProblem:
    """A row or file that can't become an item; reported, never fatal. A warning is not a skip:
    the input was used, but not exactly as written (e.g. duplicate product ids merged)."""

    where: str
    reason: str
    warning: bool = False
