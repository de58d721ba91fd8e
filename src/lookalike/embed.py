"""Feature extractors running in ONNX Runtime.

Default: EfficientNet-Lite0 (ImageNet), exported by `lookalike models pull` with its last
feature map as output, so the pooling is chosen here. Any other ONNX image model works too:
output [N, D] is used as is, [N, C, H, W] is pooled. Its preprocessing comes from the ONNX
metadata keys lookalike.input_size / lookalike.mean / lookalike.std, defaulting to ImageNet's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.errors import LookalikeError
from lookalike.models import onnx_metadata
from lookalike.onnx import image_tensor, session

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _floats(text: str | None, default: tuple[float, ...]) -> np.ndarray:
    values = tuple(float(v) for v in text.split(",")) if text else default
    return np.asarray(values, dtype=np.float32).reshape(1, 1, 3)


def l2_normalize(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(norm, 1e-12)).astype(np.float32)


class Embedder:
    """Image -> L2-normalised vector. `pooling` is 'avg' or 'gem' for feature-map outputs."""

    def __init__(self, path: Path | str, threads: int = 1, pooling: str = "avg", gem_p: float = 3.0,
                 size: int | None = None):  # fmt: skip
        self.path = Path(path)
        self.session = session(path, threads)
        meta = onnx_metadata(self.session)
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4:
            raise LookalikeError(f"{path}: embedder input must be an image tensor [N,C,H,W] or [N,H,W,C]")
        self.input_name = inp.name
        self.nchw = inp.shape[1] == 3
        fixed = [d for d in (inp.shape[2:] if self.nchw else inp.shape[1:3]) if isinstance(d, int)]
        native = int(meta.get("lookalike.input_size") or (fixed[0] if fixed else 224))
        if size and fixed and size != fixed[0]:
            raise LookalikeError(f"{path}: takes {fixed[0]}x{fixed[0]} images only, not {size}")
        self.size = size or native
        self.mean = _floats(meta.get("lookalike.mean"), IMAGENET_MEAN)
        self.std = _floats(meta.get("lookalike.std"), IMAGENET_STD)
        self.scale = (1.0 / self.std).reshape(3).astype(np.float32)
        self.bias = (-self.mean / self.std).reshape(3).astype(np.float32)
        self.batchable = not isinstance(inp.shape[0], int)
        if pooling not in ("avg", "gem"):
            raise LookalikeError(f"unknown pooling {pooling!r}: use avg or gem")
        self.pooling = pooling
        self.gem_p = gem_p
        self.dim = int(self._run([Image.new("RGB", (self.size, self.size), "white")]).shape[1])

    def preprocess(self, img: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """(pixel - mean) / std at the model's size, as pixel * (1 / std) - mean / std (same to 1e-6)."""
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        return image_tensor(img, self.scale, self.bias, self.nchw, out)

    def _pool(self, out: np.ndarray) -> np.ndarray:
        if out.ndim == 2:
            return out
        if out.ndim != 4:
            raise LookalikeError(f"{self.path}: embedder output must be [N,D] or [N,C,H,W], got {out.shape}")
        if self.pooling == "gem":
            return np.power(np.mean(np.power(np.clip(out, 1e-6, None), self.gem_p), axis=(2, 3)), 1 / self.gem_p)
        return out.mean(axis=(2, 3))

    def _run(self, images: list[Image.Image]) -> np.ndarray:
        shape = (3, self.size, self.size) if self.nchw else (self.size, self.size, 3)
        batch = np.empty((len(images), *shape), np.float32)
        for im, row in zip(images, batch, strict=True):
            self.preprocess(im, row)
        if self.batchable:
            out = self.session.run(None, {self.input_name: batch})[0]
        else:
            out = np.concatenate([self.session.run(None, {self.input_name: b[None]})[0] for b in batch])
        return self._pool(out)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """[N, dim] float32, unit length."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(self._run(images))


class Whitening:
    """PCA whitening learned on a catalog's vectors (Jégou & Chum 2012), with shrinkage:
    components are divided by std**power (1 = full whitening, 0.5 = the square root), then the
    result is L2-normalised. It also shrinks the vectors to `dim` components."""

    def __init__(self, mean: np.ndarray, matrix: np.ndarray):
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @classmethod
    def fit(cls, vectors: np.ndarray, dim: int, power: float = 0.5, eps: float = 1e-6) -> Whitening:
        vectors = vectors.astype(np.float64)
        mean = vectors.mean(axis=0)
        _, s, vt = np.linalg.svd(vectors - mean, full_matrices=False)
        dim = max(1, min(dim, vt.shape[0] - 1))
        std = s[:dim] / np.sqrt(len(vectors))
        return cls(mean, vt[:dim].T / (std + eps) ** power)

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return l2_normalize((np.atleast_2d(vectors) - self.mean) @ self.matrix)


WHITEN_MIN_IMAGES = 100  # below this a catalog is searched with raw vectors
WHITEN_REFIT_CHANGE = 0.2  # refit when the catalog's size changed by this fraction


def learn_whitening(config, vectors: np.ndarray) -> Whitening | None:
    """The projection a catalog with these vectors uses: None when off or too few images."""
    if not config.whiten or len(vectors) < WHITEN_MIN_IMAGES:
        return None
    return Whitening.fit(vectors, config.whiten, config.whiten_power)
