"""ONNX Runtime sessions, set up once for every model lookalike runs (detector, embedder, tuning trunk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from lookalike.errors import LookalikeError


def session(path: Path | str, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Detector and embedder run one after the other: a pool left spinning steals the other's cores
    # (measured: 38 ms -> 16 ms for the two on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise LookalikeError(f"{path}: not a loadable ONNX model ({e})") from None


def image_tensor(img: Image.Image, scale: np.ndarray, bias: np.ndarray, nchw: bool, out: np.ndarray | None = None
                 ) -> np.ndarray:  # fmt: skip
    """An RGB image as a model input, pixel * scale + bias per channel, written straight into `out`
    ([3,H,W] or [H,W,3] float32, e.g. one row of a batch): no float copy of the image, no transpose
    copy (2 ms of a 288-px embedder input, measured, against 0.4 ms)."""
    pixels = np.asarray(img)
    if out is None:
        out = np.empty((3, *pixels.shape[:2]) if nchw else pixels.shape, np.float32)
    if nchw:
        for c in range(3):
            np.multiply(pixels[:, :, c], scale[c], out=out[c], casting="unsafe")
            out[c] += bias[c]
    else:
        np.multiply(pixels, scale, out=out, casting="unsafe")
        out += bias
    return out
