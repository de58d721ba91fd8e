"""ONNX Runtime sessions, set up once for every model lookalike runs (detector, embedder, tuning trunk)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

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
