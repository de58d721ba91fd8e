"""From an image to a vector with one configuration: detect, crop, embed. What indexing, search
and evaluation share, so a catalog photo and a query photo always take the same path.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike import models
from lookalike.config import PipelineConfig
from lookalike.crop import Crop, choose_crop, skips_detector
from lookalike.detect import Box, load_detector
from lookalike.embed import Embedder, l2_normalize
from lookalike.errors import BadImageError, LookalikeError
from lookalike.images import DEFAULT_LIMITS, ImageInput, Limits, Photo, read_photo

BATCH = 64
Progress = Callable[[int, int | None], None]  # (done, total) of one stage
StageProgress = Callable[[str, int, "int | None"], None]  # (stage, done, total): long jobs with several stages


def stage(progress: StageProgress | None, name: str) -> Progress | None:
    """One stage's view of a several-stage progress callback (the one adapter between the two)."""
    return (lambda done, total: progress(name, done, total)) if progress else None


class LoadedModels:
    """The detector and embedder, loaded once on first use and shared by threads."""

    def __init__(self, config: PipelineConfig, threads: int = 1):
        self.config = config
        self.threads = threads
        self._lock = threading.Lock()
        self._detector = None
        self._embedder: Embedder | None = None

    @property
    def loaded(self) -> bool:
        return self._detector is not None and self._embedder is not None

    @property
    def detector(self):
        with self._lock:
            if self._detector is None:
                path = self.config.detector or models.resolve(models.DETECTOR)
                self._detector = load_detector(path, self.threads)
            return self._detector

    @property
    def embedder(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                path = self.config.embedder or models.resolve(models.EMBEDDER)
                self._embedder = Embedder(path, self.threads, pooling=self.config.pooling, gem_p=self.config.gem_p,
                                          size=self.config.embed_size or None)  # fmt: skip
            return self._embedder


@dataclass(frozen=True)
class Query:
    """A loaded query photo and the shoes found in it."""

    image: Image.Image
    boxes: list[Box]


@dataclass(frozen=True)
class Processed:
    vector: np.ndarray
    boxes: list[Box]
    crop: Crop


def process(
    mdl: LoadedModels, img: Image.Image, box: Box | None = None, boxes: list[Box] | None = None, whole: bool = False
) -> Processed:
    """The one path every image takes, catalog or query: detect, crop, embed."""
    if boxes is None:
        boxes = detect_unless_plain(mdl, img) if box is None and not whole else mdl.detector(img)
    config = replace(mdl.config.crop, strategy="whole") if whole else mdl.config.crop
    crop = choose_crop(img, boxes, config, manual=box)
    if mdl.config.flip:
        pair = mdl.embedder([crop.image, crop.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
        vector = l2_normalize(pair.sum(axis=0))
    else:
        vector = mdl.embedder([crop.image])[0]
    return Processed(vector, boxes, crop)


def detect_unless_plain(mdl: LoadedModels, img: Image.Image) -> list[Box]:
    """The detector's boxes, or none for a product shot on plain white when `crop.plain` is on: its
    non-white box is the crop then, and the detector's time is saved."""
    return [] if skips_detector(img, mdl.config.crop) else mdl.detector(img)


class Encoder:
    """Image bytes to vectors with one configuration: what indexing, search and eval share."""

    def __init__(self, config: PipelineConfig, threads: int = 1, limits: Limits = DEFAULT_LIMITS):
        self.config = config
        self.models = LoadedModels(config, threads)
        self.limits = limits

    def photo(self, source: ImageInput) -> Photo:
        return read_photo(source, self.limits)

    def image(self, photo: Photo) -> Image.Image:
        return photo.image(self.limits)

    def load(self, source: ImageInput) -> Image.Image:
        return self.image(self.photo(source))

    @property
    def uses_boxes(self) -> bool:
        return self.config.crop.uses_boxes

    def detect(self, img: Image.Image) -> list[Box]:
        return self.models.detector(img)

    def model_files(self) -> dict[str, Path]:
        return {"detector": Path(self.config.detector or models.resolve(models.DETECTOR)),
                "embedder": Path(self.config.embedder or models.resolve(models.EMBEDDER))}  # fmt: skip

    def model_fingerprints(self) -> dict[str, str]:
        """What each model the vectors come from computes (`models.fingerprint`; what a catalog records)."""
        out = {}
        for name, path in self.model_files().items():
            try:
                out[name] = models.fingerprint(path)
            except OSError as e:
                raise LookalikeError(f"{path}: the {name} model cannot be read ({e.strerror})") from None
        return out

    def fingerprints(self) -> tuple[str, str]:
        """(vectors, boxes): identify what this encoder's outputs depend on, model files included,
        so caches of them stay right when a model file changes."""
        shas = self.model_fingerprints()
        det_sha, emb_sha = shas["detector"], shas["embedder"]
        vectors = hashlib.sha256(f"{self.config.embedding_key()}|{emb_sha}|{det_sha}".encode()).hexdigest()[:20]
        return vectors, det_sha[:20]

    def crop(self, img: Image.Image, boxes: list[Box] | None = None, manual: Box | None = None) -> Crop:
        """The crop this configuration embeds for an image (what tuning learns from); `boxes`: its
        detections when already known; `manual`: the box a search used (no detection then)."""
        if boxes is None:
            boxes = detect_unless_plain(self.models, img) if self.uses_boxes and manual is None else []
        return choose_crop(img, boxes, self.config.crop, manual=manual)

    def encode(self, img: Image.Image, boxes: list[Box] | None = None, box: Box | None = None,
               whole: bool = False) -> Processed:  # fmt: skip
        if boxes is None and not self.uses_boxes:
            boxes = []  # the crop strategy does not look at boxes: skip the detector
        return process(self.models, img, box=box, boxes=boxes, whole=whole)


def run_parallel(fn: Callable, items: Iterable, threads: int, progress: Progress | None = None,
                 total: int | None = None) -> Iterator[list]:  # fmt: skip
    """fn over items on `threads` threads, yielding [(item, result), ...] a batch at a time, so the
    caller can commit as it goes. Per-image failures become reason strings (see `safely`). `items` may
    be an iterator (taken a batch at a time); `total` is then its length, for the progress."""
    done = 0
    total = len(items) if total is None and hasattr(items, "__len__") else total
    with ThreadPoolExecutor(threads) as pool:
        for part in _chunks(items, BATCH * threads):
            yield list(zip(part, pool.map(fn, part), strict=True))
            done += len(part)
            if progress:
                progress(done, total)


def safely(fn: Callable) -> Callable:
    """Wrap a per-image step: a bad image returns its reason; a missing model still stops the run."""

    def wrapped(item):
        try:
            return fn(item)
        except BadImageError as e:
            return e.reason
        except LookalikeError:
            raise
        except Exception as e:  # one bad image must not stop a long run
            return f"failed to process ({type(e).__name__}: {e})"

    return wrapped


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    source = iter(items)
    while part := list(islice(source, n)):
        yield part
