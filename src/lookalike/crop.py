"""From detected boxes to the square crop that gets embedded.

A pair of shoes is one product, so by default the crop is the union of the shoe boxes that
score at least half the best one. With no detection, the non-white area (a catalog shot on
white) is used; failing that, the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from lookalike.config import CropConfig
from lookalike.detect import Box


@dataclass(frozen=True)
class Crop:
    image: Image.Image
    path: str  # "detector", "manual", "nonwhite" or "whole"
    box: Box | None


def union_box(boxes: list[Box], relative_threshold: float) -> Box:
    best = max(b.score for b in boxes)
    kept = [b for b in boxes if b.score >= best * relative_threshold]
    label = max(kept, key=lambda b: b.score).label
    return Box(
        min(b.x1 for b in kept), min(b.y1 for b in kept), max(b.x2 for b in kept), max(b.y2 for b in kept),
        best, label,
    )  # fmt: skip


def nonwhite_box(img: Image.Image, white_level: int) -> Box | None:
    """Bounding box of the pixels darker than white_level; None when it is empty or the whole image."""
    small = img.copy()
    small.thumbnail((256, 256))
    arr = np.asarray(small.convert("L"))
    ys, xs = np.nonzero(arr < white_level)
    if len(xs) < 0.005 * arr.size:
        return None
    sx, sy = img.width / small.width, img.height / small.height
    x1, x2, y1, y2 = xs.min() * sx, (xs.max() + 1) * sx, ys.min() * sy, (ys.max() + 1) * sy
    if (x2 - x1) * (y2 - y1) > 0.97 * img.width * img.height:
        return None
    return Box(float(x1), float(y1), float(x2), float(y2), 1.0, "nonwhite")


def plain_background(img: Image.Image, white_level: int, share: float = 0.98) -> bool:
    """Whether a photo is a product shot on white: nearly all of its outermost pixels are white (a
    shopper's photo, a floor, a street never are), so its non-white box is the product."""
    small = img.convert("L")
    small.thumbnail((128, 128))
    arr = np.asarray(small)
    border = np.concatenate([arr[:2].ravel(), arr[-2:].ravel(), arr[:, :2].ravel(), arr[:, -2:].ravel()])
    return bool((border >= white_level).mean() >= share)


def skips_detector(img: Image.Image, config: CropConfig) -> bool:
    """Whether this configuration crops this photo without the detector: `plain` is on and the photo
    is a product shot on white (its non-white box is then the crop)."""
    return config.plain and config.uses_boxes and plain_background(img, config.white_level)


def square_crop(img: Image.Image, box: Box, margin: float, pad_color: tuple[int, int, int]) -> Image.Image:
    """Crop box plus margin, then pad to a square so the embedder sees undistorted shoes."""
    w, h = box.x2 - box.x1, box.y2 - box.y1
    mx, my = w * margin, h * margin
    x1, y1 = max(0, int(box.x1 - mx)), max(0, int(box.y1 - my))
    x2, y2 = min(img.width, int(np.ceil(box.x2 + mx))), min(img.height, int(np.ceil(box.y2 + my)))
    if x2 <= x1 or y2 <= y1:
        x1, y1, x2, y2 = 0, 0, img.width, img.height
    return pad_square(img.crop((x1, y1, x2, y2)), pad_color)


def pad_square(img: Image.Image, pad_color: tuple[int, int, int]) -> Image.Image:
    side = max(img.size)
    if img.width == img.height:
        return img
    canvas = Image.new("RGB", (side, side), pad_color)
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def choose_crop(img: Image.Image, boxes: list[Box], config: CropConfig, manual: Box | None = None) -> Crop:
    if manual is not None:
        return Crop(square_crop(img, manual, config.margin, config.pad_color), "manual", manual)
    if config.strategy in ("union", "best") and boxes:
        if config.strategy == "best":
            box = max(boxes, key=lambda b: b.score)
        else:
            box = union_box(boxes, config.relative_threshold)
        return Crop(square_crop(img, box, config.margin, config.pad_color), "detector", box)
    if config.strategy != "whole":
        box = nonwhite_box(img, config.white_level)
        if box is not None:
            return Crop(square_crop(img, box, config.margin, config.pad_color), "nonwhite", box)
    return Crop(pad_square(img, config.pad_color), "whole", None)
