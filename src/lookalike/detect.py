"""Shoe detectors running in ONNX Runtime.

Default: MediaPipe's SSD-MobileNetV2 trained on Open Images v4 (classes Footwear, Boot, High
heels among 24). Option: any YOLOv8 detector exported to ONNX (output 1x(4+C)xN, class names in
the ONNX metadata, as Ultralytics writes them).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.errors import LookalikeError
from lookalike.models import onnx_metadata
from lookalike.onnx import image_tensor, session

SSD_SCALE, SSD_BIAS = np.full(3, 1 / 127.5, np.float32), np.full(3, -1.0, np.float32)  # pixels to [-1, 1]
YOLO_SCALE, YOLO_BIAS = np.full(3, 1 / 255, np.float32), np.zeros(3, np.float32)  # pixels to [0, 1]
SHOE_CLASS = re.compile(r"footwear|boot|high heel|sandal|shoe|sneaker|slipper", re.IGNORECASE)


@dataclass(frozen=True)
class Box:
    """A detection in pixel coordinates of the image it was found in."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    label: str

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Box:
        return cls(
            float(d["x1"]), float(d["y1"]), float(d["x2"]), float(d["y2"]),
            float(d.get("score", 1.0)), str(d.get("label", "manual")),
        )  # fmt: skip


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression over [N,4] x1y1x2y2 boxes; returns kept indices."""
    order = np.argsort(-scores)
    keep: list[int] = []
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        union = areas[i] + areas[rest] - inter
        overlap = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[overlap <= iou]
    return keep


def ssd_anchors(
    input_size: int = 300,
    num_layers: int = 6,
    min_scale: float = 0.2,
    max_scale: float = 0.95,
    strides: tuple[int, ...] = (16, 32, 64, 128, 256, 512),
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 0.3333),
    offset: float = 0.5,
) -> np.ndarray:
    """MediaPipe's SsdAnchorsCalculator: [N,4] anchors as (y_center, x_center, h, w), normalised."""

    def scale_at(i: int) -> float:
        return min_scale + (max_scale - min_scale) * i / (len(strides) - 1)

    anchors = []
    for layer in range(num_layers):
        if layer == 0:
            ratios, scales = [1.0, 2.0, 0.5], [0.1, scale_at(0), scale_at(0)]
        else:
            s = scale_at(layer)
            ratios, scales = list(aspect_ratios), [s] * len(aspect_ratios)
            s_next = 1.0 if layer == len(strides) - 1 else scale_at(layer + 1)
            ratios.append(1.0)
            scales.append(math.sqrt(s * s_next))
        size = math.ceil(input_size / strides[layer])
        for y in range(size):
            for x in range(size):
                for r, s in zip(ratios, scales, strict=True):
                    anchors.append(((y + offset) / size, (x + offset) / size, s / math.sqrt(r), s * math.sqrt(r)))
    return np.asarray(anchors, dtype=np.float32)


class SSDDetector:
    """Open Images SSD from MediaPipe, decoded as MediaPipe's TensorsToDetectionsCalculator does."""

    input_size = 300

    def __init__(self, path: Path | str, threads: int = 1, min_score: float = 0.3, iou: float = 0.45):
        self.session = session(path, threads)
        meta = onnx_metadata(self.session)
        names = json.loads(meta["names"]) if "names" in meta else {}
        self.names = {int(k): v for k, v in names.items()}
        self.shoe_ids = np.array(sorted(i for i, n in self.names.items() if SHOE_CLASS.search(n)), dtype=np.int64)
        if self.shoe_ids.size == 0:
            raise LookalikeError(f"{path}: no shoe classes among the detector's labels")
        self.input_name = self.session.get_inputs()[0].name
        self.nchw = self.session.get_inputs()[0].shape[1] == 3
        self.anchors = ssd_anchors(self.input_size)
        self.min_score = min_score
        self.iou = iou

    def input_tensor(self, img: Image.Image) -> np.ndarray:
        """The model's input for a photo (also what int8 calibration feeds it)."""
        small = img.resize((self.input_size, self.input_size), Image.BILINEAR)
        return image_tensor(small, SSD_SCALE, SSD_BIAS, self.nchw)[None]  # pixel / 127.5 - 1

    def __call__(self, img: Image.Image) -> list[Box]:
        w, h = img.size
        raw_boxes, logits = self.session.run(None, {self.input_name: self.input_tensor(img)})
        raw_boxes, logits = raw_boxes[0], logits[0]
        scores = 1.0 / (1.0 + np.exp(-logits[:, self.shoe_ids]))
        best = scores.argmax(1)
        best_score = scores[np.arange(len(scores)), best]
        sel = np.nonzero(best_score >= self.min_score)[0]
        if sel.size == 0:
            return []
        a = self.anchors[sel]
        r = raw_boxes[sel]
        yc = r[:, 0] / 10.0 * a[:, 2] + a[:, 0]
        xc = r[:, 1] / 10.0 * a[:, 3] + a[:, 1]
        bh = np.exp(r[:, 2] / 5.0) * a[:, 2]
        bw = np.exp(r[:, 3] / 5.0) * a[:, 3]
        xyxy = np.stack([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], 1)
        xyxy = np.clip(xyxy, 0.0, 1.0) * np.array([w, h, w, h], dtype=np.float32)
        return _boxes(xyxy, best_score[sel], [self.names[int(self.shoe_ids[c])] for c in best[sel]], self.iou)


class YoloV8Detector:
    """Any Ultralytics YOLOv8 detector exported to ONNX; only its shoe classes are kept."""

    def __init__(self, path: Path | str, threads: int = 1, min_score: float = 0.25, iou: float = 0.45):
        self.session = session(path, threads)
        meta = onnx_metadata(self.session)
        if "names" not in meta:
            raise LookalikeError(f"{path}: YOLOv8 ONNX model has no 'names' metadata")
        names = _parse_names(meta["names"])
        self.names = names
        self.shoe_ids = np.array(sorted(i for i, n in names.items() if SHOE_CLASS.search(n)), dtype=np.int64)
        if self.shoe_ids.size == 0:
            raise LookalikeError(f"{path}: no shoe classes among the detector's labels")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        size = (
            inp.shape[2] if isinstance(inp.shape[2], int) else int(meta.get("imgsz", "[640]").strip("[]").split(",")[0])
        )
        self.input_size = size
        self.min_score = min_score
        self.iou = iou

    def _letterbox(self, img: Image.Image) -> tuple[np.ndarray, int, int, float]:
        w, h = img.size
        s = self.input_size
        scale = min(s / w, s / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (s, s), (114, 114, 114))
        left, top = (s - nw) // 2, (s - nh) // 2
        canvas.paste(img.resize((nw, nh), Image.BILINEAR), (left, top))
        return image_tensor(canvas, YOLO_SCALE, YOLO_BIAS, nchw=True)[None], left, top, scale

    def input_tensor(self, img: Image.Image) -> np.ndarray:
        """The model's input for a photo (also what int8 calibration feeds it)."""
        return self._letterbox(img)[0]

    def __call__(self, img: Image.Image) -> list[Box]:
        w, h = img.size
        x, left, top, scale = self._letterbox(img)
        out = self.session.run(None, {self.input_name: x})[0][0]  # (4+C, N)
        cls = out[4:][self.shoe_ids].T  # (N, shoe classes)
        best = cls.argmax(1)
        best_score = cls[np.arange(len(cls)), best]
        sel = np.nonzero(best_score >= self.min_score)[0]
        if sel.size == 0:
            return []
        cx, cy, bw, bh = out[0, sel], out[1, sel], out[2, sel], out[3, sel]
        xyxy = np.stack([cx - bw / 2 - left, cy - bh / 2 - top, cx + bw / 2 - left, cy + bh / 2 - top], 1) / scale
        xyxy = np.clip(xyxy, 0, [w, h, w, h]).astype(np.float32)
        return _boxes(xyxy, best_score[sel], [self.names[int(self.shoe_ids[c])] for c in best[sel]], self.iou)


def _boxes(xyxy: np.ndarray, scores: np.ndarray, labels: list[str], iou: float) -> list[Box]:
    keep = nms(xyxy, scores, iou)
    boxes = [Box(*map(float, xyxy[i]), float(scores[i]), labels[i]) for i in keep]
    return [b for b in boxes if b.area > 0]


def _parse_names(text: str) -> dict[int, str]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = json.loads(text)
    if isinstance(value, list):
        value = dict(enumerate(value))
    return {int(k): str(v) for k, v in value.items()}


def load_detector(path: Path | str, threads: int = 1) -> SSDDetector | YoloV8Detector:
    """Pick the decoder from the model itself: our SSD is tagged; otherwise a YOLOv8 layout."""
    kind = onnx_metadata(session(path, 1)).get("lookalike.kind")
    if kind == "ssd-mediapipe":
        return SSDDetector(path, threads)
    return YoloV8Detector(path, threads)
