"""The pipeline for labelled photos outside any catalog: eval's queries and gallery, tuning on chosen rows.

Each photo takes a catalog image's path (one `Encoder`: read -> hash -> decode -> boxes -> crop ->
vector), so what eval measures is what a catalog would hold. Vectors are cached by image content and a
fingerprint of the config and model files, boxes by image content and detector, in one SQLite file
(`records.connect`) that keeps the most recently written MAX_CACHED vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.config import PipelineConfig
from lookalike.crop import skips_detector
from lookalike.detect import Box
from lookalike.embed import learn_whitening
from lookalike.encoder import Encoder, Progress, StageProgress, run_parallel, safely, stage
from lookalike.errors import LookalikeError
from lookalike.ranking import rank_labels
from lookalike.records import connect

MAX_CACHED = 500_000  # vectors kept in the eval cache (about 1 GB at 512 dimensions)


def default_cache() -> Path:
    return Path(os.environ.get("LOOKALIKE_EVAL_CACHE", Path.home() / ".cache" / "lookalike" / "eval.db"))


class VectorCache:
    """SQLite: vectors by (image sha256, configuration fingerprint), boxes by (image sha256, detector)."""

    def __init__(self, path: Path):
        self.db = connect(path)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (sha TEXT, config TEXT, vector BLOB, PRIMARY KEY (sha, config))"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS boxes (sha TEXT, detector TEXT, boxes TEXT, PRIMARY KEY (sha, detector))"
        )
        self.lock = threading.Lock()

    def vector(self, sha: str, config: str) -> np.ndarray | None:
        with self.lock:
            row = self.db.execute("SELECT vector FROM vectors WHERE sha=? AND config=?", (sha, config)).fetchone()
        return np.frombuffer(row[0], dtype=np.float32) if row else None

    def put_vector(self, sha: str, config: str, vector: np.ndarray) -> None:
        with self.lock:
            self.db.execute(
                "INSERT OR REPLACE INTO vectors VALUES (?,?,?)", (sha, config, vector.astype(np.float32).tobytes())
            )

    def boxes(self, sha: str, detector: str) -> list[Box] | None:
        with self.lock:
            row = self.db.execute("SELECT boxes FROM boxes WHERE sha=? AND detector=?", (sha, detector)).fetchone()
        return [Box.from_dict(b) for b in json.loads(row[0])] if row else None

    def put_boxes(self, sha: str, detector: str, boxes: list[Box]) -> None:
        with self.lock:
            self.db.execute(
                "INSERT OR REPLACE INTO boxes VALUES (?,?,?)", (sha, detector, json.dumps([b.to_dict() for b in boxes]))
            )

    def prune(self, keep: int = MAX_CACHED) -> int:
        """Drop all but the `keep` most recently written vectors (and boxes); returns the vectors dropped."""
        with self.lock:
            n = self.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
            if n <= keep:
                return 0
            self.db.execute("DELETE FROM vectors WHERE rowid IN (SELECT rowid FROM vectors ORDER BY rowid LIMIT ?)",
                            (n - keep,))  # fmt: skip
            self.db.execute("DELETE FROM boxes WHERE rowid IN (SELECT rowid FROM boxes ORDER BY rowid LIMIT "
                            "max(0, (SELECT COUNT(*) FROM boxes) - ?))", (keep,))  # fmt: skip
            return n - keep

    def close(self) -> None:
        self.db.close()


class Photos:
    """Vectors and crops of photos given by path, with one pipeline configuration."""

    def __init__(self, config: PipelineConfig, threads: int = 2, cache: Path | None = None):
        self.config = config
        self.threads = threads
        self.encoder = Encoder(config, threads=1)
        self.cache_path = cache or default_cache()

    def vectors(self, paths: list[str], progress: StageProgress | None = None
                ) -> tuple[np.ndarray, list[tuple[str, str]]]:  # fmt: skip
        """[len(paths), dim] vectors (NaN rows where a photo failed) and the failures (path, reason)."""
        cache = VectorCache(self.cache_path)
        config_key, detector_key = self.encoder.fingerprints()
        encoder = self.encoder

        def one(path: str) -> np.ndarray:
            photo = encoder.photo(path)
            cached = cache.vector(photo.sha256, config_key)
            if cached is not None:
                return cached
            img = encoder.image(photo)
            boxes = None
            if skips_detector(img, encoder.config.crop):
                boxes = []
            elif encoder.uses_boxes:
                boxes = cache.boxes(photo.sha256, detector_key)
                if boxes is None:
                    boxes = encoder.detect(img)
                    cache.put_boxes(photo.sha256, detector_key, boxes)
            vector = encoder.encode(img, boxes=boxes).vector
            cache.put_vector(photo.sha256, config_key, vector)
            return vector

        vectors: list[np.ndarray | None] = []
        failed = []
        try:
            for batch in run_parallel(safely(one), paths, self.threads, stage(progress, "embedding")):
                for path, out in batch:
                    failed += [(path, out)] if isinstance(out, str) else []
                    vectors.append(None if isinstance(out, str) else out)
            cache.prune()
        finally:
            cache.close()
        dim = next((v.shape[0] for v in vectors if v is not None), 1)
        return np.stack([v if v is not None else np.full(dim, np.nan, np.float32) for v in vectors]), failed

    def crops(self, paths: list[str], progress: Progress | None = None) -> tuple[list[Image.Image], list[int],
                                                                                  list[tuple[str, str]]]:  # fmt: skip
        """The crops this config embeds (what tuning learns from), the indices of the paths they came
        from, and the failures."""
        crop = safely(lambda item: self.encoder.crop(self.encoder.load(item[1])))
        crops, kept, failed = [], [], []
        for batch in run_parallel(crop, list(enumerate(paths)), self.threads, progress):
            for (i, path), out in batch:
                if isinstance(out, str):
                    failed.append((path, out))
                else:
                    crops.append(out.image)
                    kept.append(i)
        return crops, kept, failed

    def crop_box(self, path: str) -> Box | None:
        """The box this configuration crops from a photo (None: the whole image), to show what was
        searched; detections come from the cache when they are there."""
        photo = self.encoder.photo(path)
        boxes = None
        if self.encoder.uses_boxes:
            cache = VectorCache(self.cache_path)
            try:
                boxes = cache.boxes(photo.sha256, self.encoder.fingerprints()[1])
            finally:
                cache.close()
        return self.encoder.crop(self.encoder.image(photo), boxes).box

    def learn_projection(self, gallery: np.ndarray):
        """The whitening a catalog holding these vectors would learn (None when off or too few)."""
        return learn_whitening(self.config, gallery)

    def tune(self, paths: list[str], labels: list[str], options: dict[str, str], folder: Path,
             progress: StageProgress | None = None,
             shopper: list[bool] | None = None) -> tuple[Path, dict]:  # fmt: skip
        """An embedder tuned on these photos with these labels as product ids (see `tune.py`; `shopper[i]`:
        photo i is a shopper's, as feedback), cached in `folder` by the photos' contents, the labels,
        the options and the model files."""
        from lookalike.tune import options_from_text, tune_model

        tune_options = options_from_text(options, size=self.encoder.models.embedder.size)
        key = hashlib.sha256(json.dumps([asdict(tune_options), self.encoder.fingerprints(),
                                         self.config.to_json()]).encode())  # fmt: skip
        shopper = shopper or [False] * len(paths)
        for path, label, own in zip(paths, labels, shopper, strict=True):
            try:
                key.update(f"{self.encoder.photo(path).sha256}|{label}|{'shopper|' if own else ''}".encode())
            except LookalikeError:
                key.update(f"unreadable {path}|".encode())
        path = folder / f"tuned-{key.hexdigest()[:16]}.onnx"
        if path.exists():
            return path, {"cached": True}
        folder.mkdir(parents=True, exist_ok=True)
        crops, kept, failed = self.crops(paths, stage(progress, "crops"))
        report = tune_model(
            crops, [labels[i] for i in kept], path, tune_options, progress, self.threads, [shopper[i] for i in kept]
        )
        return path, {**asdict(report), "failed": len(failed)}


def rank_products(sim: np.ndarray, labels: list[str], rank: str) -> tuple[np.ndarray, list[str]]:
    """Image similarities -> product scores, as search ranks products (`ranking.py`)."""
    return rank_labels(sim, labels, rank)
