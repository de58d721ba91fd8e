"""Rebuilding a catalog's vectors with other model files: after a model file changed (`reindex`), or
with an embedder tuned on the catalog's own photos (`tune`). The new vectors are made beside the live
ones and the caller swaps them in one transaction; until then searches go on with the old ones."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.detect import Box
from lookalike.encoder import Encoder, StageProgress, run_parallel, safely, stage
from lookalike.errors import LookalikeError
from lookalike.records import Records

Shopper = tuple[Path, tuple[float, float, float, float] | None, str]  # a feedback photo, its box, its product


def tuned_model(records: Records, encoder: Encoder, directory: Path, options: dict[str, str], threads: int,
                progress: StageProgress | None, shoppers: list[Shopper] = ()) -> tuple[dict, Path, int]:  # fmt: skip
    """Train an embedder on the catalog's crops (product ids as labels; `tune.py`) and on shoppers'
    photos of its products (feedback: photo, the box searched or given, product), each cropped as a
    search crops it; save it under the catalog's models/ folder, named by its hash. Returns (training
    report, model file, input size)."""
    from lookalike.tune import options_from_text, tune_model

    tune_options = options_from_text(options, size=encoder.models.embedder.size)
    keys = sorted(records.known())
    if len({p for p, _ in keys}) < 2:
        raise LookalikeError(f"{directory}: tuning needs a catalog with at least 2 products")
    crop = safely(lambda key: encoder.crop(encoder.load(key[1])))
    crops, labels = [], []
    for batch in run_parallel(crop, keys, threads, stage(progress, "crops")):
        for (product_id, _), out in batch:
            if not isinstance(out, str):
                crops.append(out.image)
                labels.append(product_id)
    catalog_crops = len(crops)
    products = set(labels)
    wanted = [s for s in shoppers if s[2] in products]  # feedback on a product removed since is left out
    shopper_crop = safely(lambda s: encoder.crop(encoder.load(str(s[0])), manual=_box(s[1])))
    for batch in run_parallel(shopper_crop, wanted, threads, stage(progress, "feedback crops")):
        for (_, _, product_id), out in batch:
            if not isinstance(out, str):
                crops.append(out.image)
                labels.append(product_id)
    shopper = [False] * catalog_crops + [True] * (len(crops) - catalog_crops)
    report, final = _saved(directory, "tuned", lambda dst: tune_model(crops, labels, dst, tune_options, progress,
                                                                       threads, shopper))  # fmt: skip
    return asdict(report), final, tune_options.size


def _box(box: tuple[float, float, float, float] | None) -> Box | None:
    return Box(*box, 1.0, "manual") if box else None


def _saved(directory: Path, prefix: str, write: Callable[[Path], Any]) -> tuple[Any, Path]:
    """A model file written by `write(dst=tmp)` into the catalog's models/ folder, then named by its hash
    (`<prefix>-<sha>.onnx`); a failed write leaves nothing behind. Returns (what write returned, file)."""
    from lookalike.models import sha256_file

    folder = directory / "models"
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{prefix}-{os.getpid()}.onnx"
    try:
        result = write(dst=tmp)
        final = folder / f"{prefix}-{sha256_file(tmp)[:16]}.onnx"
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return result, final


def int8_models(records: Records, encoder: Encoder, directory: Path, which: tuple[str, ...],
                progress: StageProgress | None) -> dict[str, Path]:  # fmt: skip
    """int8 versions of the models the catalog runs now (`quantize.py`), calibrated on up to
    CALIBRATION_IMAGES of its own photos spread over it, saved under models/ named by their hash."""
    from lookalike.models import onnx_metadata
    from lookalike.quantize import CALIBRATION_IMAGES, quantize

    if unknown := set(which) - {"detector", "embedder"}:
        raise LookalikeError(f"int8 models: {', '.join(sorted(unknown))}? expected detector and/or embedder")
    det, emb = encoder.models.detector, encoder.models.embedder
    loaded = {"detector": det, "embedder": emb}
    for name in which:
        if "lookalike.int8_of" in onnx_metadata(loaded[name].session):
            raise LookalikeError(f"{directory}: its {name} is int8 already ({encoder.model_files()[name]})")
    keys = sorted(records.known())
    picked = keys[:: max(1, len(keys) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES]
    inputs: dict[str, list[np.ndarray]] = {"detector": [], "embedder": []}
    report = stage(progress, "calibration photos")
    for n, (_, image) in enumerate(picked, 1):
        try:
            img = encoder.load(image)
        except LookalikeError:
            continue  # an unreadable photo calibrates nothing
        inputs["detector"].append(det.input_tensor(img))
        inputs["embedder"].append(emb.preprocess(encoder.crop(img).image)[None])
        if report:
            report(n, len(picked))
    out: dict[str, Path] = {}
    try:
        for name in which:
            src = encoder.model_files()[name]
            write = partial(quantize, src, input_name=loaded[name].input_name, inputs=inputs[name])
            _, out[name] = _saved(directory, f"int8-{name}", write)
    except BaseException:
        for path in out.values():  # the first model's file when the second failed
            path.unlink(missing_ok=True)
        raise
    return out


Rebuilt = dict[tuple[str, str], tuple[np.ndarray, str, dict | None]]  # (product, image) -> (vector, crop, box)


def embed_all(records: Records, encoder: Encoder, threads: int, progress: StageProgress | None) -> Rebuilt:
    """Every catalog image embedded with `encoder`. An image
    that can no longer be read stops the rebuild (the catalog must not keep vectors of two models)."""

    def embed(key):
        out = encoder.encode(encoder.load(key[1]))
        return out.vector, out.crop.path, out.crop.box.to_dict() if out.crop.box else None

    vectors, failed = {}, []
    for batch in run_parallel(safely(embed), sorted(records.known()), threads, stage(progress, "re-embedding")):
        for key, out in batch:
            (failed.append(key) if isinstance(out, str) else vectors.__setitem__(key, out))
    if failed:
        raise LookalikeError(
            f"{len(failed)} catalog image(s) can no longer be read (e.g. {failed[0][1]}): "
            "index the source again (it drops them) before rebuilding the vectors"
        )
    return vectors
