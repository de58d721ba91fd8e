"""Rebuilding a catalog's vectors with other model files: after a model file changed (`reindex`), or
with an embedder tuned on the catalog's own photos (`tune`). The new vectors are made beside the live
ones and the caller swaps them in one transaction; until then searches go on with the old ones."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lookalike.catalog import CatalogDB
from lookalike.encoder import Encoder, StageProgress, run_parallel, safely, stage
from lookalike.errors import LookalikeError


def tuned_model(store: CatalogDB, encoder: Encoder, directory: Path, options: dict[str, str],
                threads: int, progress: StageProgress | None) -> tuple[dict, Path, int]:  # fmt: skip
    """Train an embedder on the catalog's crops (product ids as labels; `tune.py`) and save it under
    the catalog's models/ folder, named by its hash. Returns (training report, model file, input size)."""
    from lookalike.models import sha256_file
    from lookalike.tune import options_from_text, tune_model

    tune_options = options_from_text(options, size=encoder.models.embedder.size)
    keys = sorted(store.known())
    if len({p for p, _ in keys}) < 2:
        raise LookalikeError(f"{directory}: tuning needs a catalog with at least 2 products")
    crop = safely(lambda key: encoder.crop(encoder.load(key[1])))
    crops, labels = [], []
    for batch in run_parallel(crop, keys, threads, stage(progress, "crops")):
        for (product_id, _), out in batch:
            if not isinstance(out, str):
                crops.append(out.image)
                labels.append(product_id)
    folder = directory / "models"
    folder.mkdir(exist_ok=True)
    tmp = folder / f".tuning-{os.getpid()}.onnx"
    try:
        report = tune_model(crops, labels, tmp, tune_options, progress, threads)
        final = folder / f"tuned-{sha256_file(tmp)[:16]}.onnx"
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return asdict(report), final, tune_options.size


def int8_models(store: CatalogDB, encoder: Encoder, directory: Path, which: tuple[str, ...],
                progress: StageProgress | None) -> dict[str, Path]:  # fmt: skip
    """int8 versions of the models the catalog runs now (`quantize.py`), calibrated on up to
    CALIBRATION_IMAGES of its own photos spread over it, saved under models/ named by their hash."""
    from lookalike.models import onnx_metadata, sha256_file
    from lookalike.quantize import CALIBRATION_IMAGES, quantize

    if unknown := set(which) - {"detector", "embedder"}:
        raise LookalikeError(f"int8 models: {', '.join(sorted(unknown))}? expected detector and/or embedder")
    keys = sorted(store.known())
    picked = keys[:: max(1, len(keys) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES]
    det, emb = encoder.models.detector, encoder.models.embedder
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
    folder = directory / "models"
    folder.mkdir(exist_ok=True)
    out = {}
    for name in which:
        model = det if name == "detector" else emb
        if "lookalike.int8_of" in onnx_metadata(model.session):
            raise LookalikeError(f"{directory}: its {name} is int8 already ({encoder.model_files()[name]})")
        src = encoder.model_files()[name]
        tmp = quantize(src, folder / f".int8-{name}-{os.getpid()}.onnx", model.input_name, inputs[name])
        out[name] = folder / f"int8-{name}-{sha256_file(tmp)[:16]}.onnx"
        os.replace(tmp, out[name])
    return out


Rebuilt = dict[tuple[str, str], tuple[np.ndarray, str, dict | None]]  # (product, image) -> (vector, crop, box)


def embed_all(store: CatalogDB, encoder: Encoder, threads: int, progress: StageProgress | None) -> Rebuilt:
    """Every catalog image embedded with `encoder`. An image
    that can no longer be read stops the rebuild (the catalog must not keep vectors of two models)."""

    def embed(key):
        out = encoder.encode(encoder.load(key[1]))
        return out.vector, out.crop.path, out.crop.box.to_dict() if out.crop.box else None

    vectors, failed = {}, []
    for batch in run_parallel(safely(embed), sorted(store.known()), threads, stage(progress, "re-embedding")):
        for key, out in batch:
            (failed.append(key) if isinstance(out, str) else vectors.__setitem__(key, out))
    if failed:
        raise LookalikeError(
            f"{len(failed)} catalog image(s) can no longer be read (e.g. {failed[0][1]}): "
            "index the source again (it drops them) before rebuilding the vectors"
        )
    return vectors
