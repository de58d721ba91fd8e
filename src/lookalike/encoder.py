"""From an image to a vector with one configuration: detect, crop, embed. What indexing, search
and evaluation share, so a catalog photo and a query photo always take the same path.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike import models
from lookalike.crop import Crop, CropConfig, choose_crop
from lookalike.detect import Box, load_detector
from lookalike.embed import Embedder, Whitening, l2_normalize
from lookalike.errors import BadImageError, LookalikeError
from lookalike.images import DEFAULT_LIMITS, ImageSource, Limits, decode, read_bytes

BATCH = 64
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that changes the vectors: fixed per catalog, recorded in it."""

    detector: str | None = None  # ONNX path; None = the default Open Images SSD
    embedder: str | None = None  # ONNX path; None = the default EfficientNet-Lite0
    embed_size: int = 0  # embedder input size in pixels (multiple of 32); 0 = the model's preferred one
    pooling: str = "gem"  # avg | gem, for feature-map outputs
    gem_p: float = 3.0
    flip: bool = False  # average the crop's vector with its mirror image's
    # PCA whitening to this many dimensions, learned on the catalog; 0 = off. Off by default: it gains
    # 4.6 points of R@1 on suite 2 but costs 4.5 on suite 5 (products it never saw) (BENCHMARKS.md)
    whiten: int = 0
    whiten_power: float = 0.5  # 1 = full whitening, 0.5 = shrunk (divide by sqrt(std))
    crop: CropConfig = field(default_factory=CropConfig)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def embedding_key(self) -> str:
        """What the per-image vectors depend on (not the projection learned on the catalog afterwards)."""
        d = asdict(self)
        d.pop("whiten"), d.pop("whiten_power")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str) -> PipelineConfig:
        d = json.loads(text)
        crop = d.pop("crop", {})
        crop["pad_color"] = tuple(crop.get("pad_color", (255, 255, 255)))
        return cls(crop=CropConfig(**crop), **d)

    def with_options(self, options: dict[str, str]) -> PipelineConfig:
        """A copy with `key=value` options applied, e.g. {"pooling": "gem", "crop.margin": "0.1"}."""
        config, crop = asdict(self), asdict(self.crop)
        for key, text in options.items():
            target, name = (crop, key[5:]) if key.startswith("crop.") else (config, key)
            if name not in target or name == "crop":
                raise LookalikeError(f"unknown configuration option {key!r}")
            target[name] = _parse_option(key, text, target[name])
        config["crop"] = CropConfig(**{**crop, "pad_color": tuple(crop["pad_color"])})
        return PipelineConfig(**config)


def _parse_option(key: str, text: str, current: object) -> object:
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if isinstance(current, int | float):
            return type(current)(text)
        if isinstance(current, tuple | list):
            return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise LookalikeError(f"configuration option {key}={text!r}: expected a {type(current).__name__}") from None
    return None if text.lower() in ("", "none") and current is None else text


WHITEN_MIN_IMAGES = 100  # below this a catalog is searched with raw vectors
WHITEN_REFIT_CHANGE = 0.2  # refit when the catalog's size changed by this fraction


def learn_whitening(config: PipelineConfig, vectors: np.ndarray) -> Whitening | None:
    """The projection a catalog with these vectors uses: None when off or too few images."""
    if not config.whiten or len(vectors) < WHITEN_MIN_IMAGES:
        return None
    return Whitening.fit(vectors, config.whiten, config.whiten_power)


class Models:
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
    mdl: Models, img: Image.Image, box: Box | None = None, boxes: list[Box] | None = None, whole: bool = False
) -> Processed:
    """The one path every image takes, catalog or query: detect, crop, embed."""
    if boxes is None:
        boxes = mdl.detector(img)
    config = replace(mdl.config.crop, strategy="whole") if whole else mdl.config.crop
    crop = choose_crop(img, boxes, config, manual=box)
    if mdl.config.flip:
        pair = mdl.embedder([crop.image, crop.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
        vector = l2_normalize(pair.sum(axis=0))
    else:
        vector = mdl.embedder([crop.image])[0]
    return Processed(vector, boxes, crop)


class Encoder:
    """Image bytes to vectors with one configuration: what indexing, search and eval share."""

    def __init__(self, config: PipelineConfig, threads: int = 1, limits: Limits = DEFAULT_LIMITS):
        self.config = config
        self.models = Models(config, threads)
        self.limits = limits

    def read(self, source: ImageSource) -> bytes:
        return read_bytes(source, self.limits)

    def decode(self, data: bytes, name: str = "<bytes>") -> Image.Image:
        return decode(data, name, self.limits)

    @property
    def uses_boxes(self) -> bool:
        return self.config.crop.strategy in ("union", "best")

    def detect(self, img: Image.Image) -> list[Box]:
        return self.models.detector(img)

    def model_files(self) -> dict[str, Path]:
        return {"detector": Path(self.config.detector or models.resolve(models.DETECTOR)),
                "embedder": Path(self.config.embedder or models.resolve(models.EMBEDDER))}  # fmt: skip

    def model_shas(self) -> dict[str, str]:
        """Content hash of each model file the vectors come from (what a catalog records)."""
        out = {}
        for name, path in self.model_files().items():
            try:
                out[name] = models.sha256_file(path)
            except OSError as e:
                raise LookalikeError(f"{path}: the {name} model cannot be read ({e.strerror})") from None
        return out

    def fingerprints(self) -> tuple[str, str]:
        """(vectors, boxes): identify what this encoder's outputs depend on, model files included,
        so caches of them stay right when a model file changes."""
        shas = self.model_shas()
        det_sha, emb_sha = shas["detector"], shas["embedder"]
        vectors = hashlib.sha256(f"{self.config.embedding_key()}|{emb_sha}|{det_sha}".encode()).hexdigest()[:20]
        return vectors, det_sha[:20]

    def crop(self, img: Image.Image) -> Crop:
        """The crop this configuration embeds for an image (what tuning learns from)."""
        boxes = self.detect(img) if self.uses_boxes else []
        return choose_crop(img, boxes, self.config.crop)

    def encode(self, img: Image.Image, boxes: list[Box] | None = None, box: Box | None = None,
               whole: bool = False) -> Processed:  # fmt: skip
        if boxes is None and not self.uses_boxes:
            boxes = []  # the crop strategy does not look at boxes: skip the detector
        return process(self.models, img, box=box, boxes=boxes, whole=whole)


def run_parallel(fn: Callable, items: list, threads: int, progress: Progress | None = None) -> Iterator[list]:
    """fn over items on `threads` threads, yielding [(item, result), ...] a batch at a time, so the
    caller can commit as it goes. Per-image failures become reason strings (see `safely`)."""
    done = 0
    with ThreadPoolExecutor(threads) as pool:
        for part in _chunks(items, BATCH * threads):
            yield list(zip(part, pool.map(fn, part), strict=True))
            done += len(part)
            if progress:
                progress(done, len(items))


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


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
