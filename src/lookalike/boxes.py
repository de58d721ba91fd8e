"""Which part of a query photo is searched: one `BoxChoice`, made by every face the same way."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from lookalike.detect import Box
from lookalike.errors import LookalikeError

BOX_SLACK = 1.0  # pixels a drawn box may stick out of the image (rounding in a browser), then clipped


@dataclass(frozen=True)
class BoxChoice:
    """`auto` (the crop strategy decides), one `detected` box by its index, the `whole` image, or a
    `manual` box in pixels of one's own."""

    kind: Literal["auto", "detected", "whole", "manual"] = "auto"
    index: int | None = None
    box: Box | None = None

    @classmethod
    def detected(cls, index: int) -> BoxChoice:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise LookalikeError(f"box {index!r}: expected a detected box's index (0 = the first)")
        return cls("detected", index=index)

    @classmethod
    def whole(cls) -> BoxChoice:
        return cls("whole")

    @classmethod
    def manual(cls, x1: float, y1: float, x2: float, y2: float) -> BoxChoice:
        return cls("manual", box=Box(float(x1), float(y1), float(x2), float(y2), 1.0, "manual"))

    @classmethod
    def parse(cls, text: str | None) -> BoxChoice:
        """A box choice as people type it: a detected box's index, "whole", x1,y1,x2,y2 in pixels, or
        blank for automatic."""
        if text is None or not text.strip():
            return cls()
        text = text.strip()
        if text.isdigit():
            return cls.detected(int(text))
        if text == "whole":
            return cls.whole()
        try:
            x1, y1, x2, y2 = (float(v) for v in text.split(","))
        except ValueError:
            raise LookalikeError(
                f"box {text!r}: expected a detected box's index, whole, or x1,y1,x2,y2 in pixels"
            ) from None
        return cls.manual(x1, y1, x2, y2)

    def resolve(self, boxes: list[Box], img: Image.Image) -> Box | None:
        """The box to crop, among the photo's detections; None for automatic and whole."""
        if self.kind == "detected":
            if not 0 <= self.index < len(boxes):
                raise LookalikeError(f"box {self.index} does not exist: {len(boxes)} shoe(s) detected")
            return boxes[self.index]
        if self.kind == "manual":
            return _valid_box(self.box, img)
        return None


BOX_SLACK = 1.0  # pixels a drawn box may stick out of the image (rounding in a browser), then clipped


def _valid_box(box: Box, img: Image.Image) -> Box:
    """A box of one's own must be finite, have x1 < x2 and y1 < y2, lie inside the image and cover at
    least 2 x 2 pixels: anything else is a mistake to report, not a box to guess."""
    values = (box.x1, box.y1, box.x2, box.y2)
    text = ",".join(f"{v:g}" for v in values)
    w, h = img.width, img.height
    if not all(math.isfinite(v) for v in values):
        raise LookalikeError(f"box {text}: coordinates must be finite numbers")
    if box.x2 - box.x1 < 2 or box.y2 - box.y1 < 2:
        raise LookalikeError(f"box {text}: needs x1 < x2 and y1 < y2 (pixels), at least 2 pixels apart")
    if box.x1 < -BOX_SLACK or box.y1 < -BOX_SLACK or box.x2 > w + BOX_SLACK or box.y2 > h + BOX_SLACK:
        raise LookalikeError(f"box {text}: outside the {w}x{h} image")
    return Box(max(0.0, box.x1), max(0.0, box.y1), min(float(w), box.x2), min(float(h), box.y2), box.score, box.label)
