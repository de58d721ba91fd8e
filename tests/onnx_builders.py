"""Tiny ONNX models the tests build themselves, with the same input/output layouts as the options
they stand for (a YOLOv8 detector export, an arbitrary image embedder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph, path: Path, metadata: dict[str, str]) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def yolov8_like(path: Path, predictions: np.ndarray, names: dict[int, str], size: int = 64) -> Path:
    """A 'detector' whose output is always `predictions` ([4+C, N], YOLOv8 layout), whatever the input."""
    const = numpy_helper.from_array(predictions[None].astype(np.float32), "pred")
    nodes = [
        helper.make_node("ReduceSum", ["images"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["pred", "z"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "yolo_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(const.dims))],
        [const, numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    return _save(graph, path, {"names": repr(names), "imgsz": f"[{size}, {size}]"})


def conv_embedder(path: Path, pooled: bool, channels: int = 8, size: int = 32, seed: int = 0) -> Path:
    """A random conv layer: output [N, C, H, W] (pooled=False) or [N, C] (pooled=True)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(channels, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["fmap"])]
    out_shape: list = ["N", channels, size - 2, size - 2]
    if pooled:
        nodes += [
            helper.make_node("GlobalAveragePool", ["fmap"], ["g"]),
            helper.make_node("Flatten", ["g"], ["emb"]),
        ]
        out_shape = ["N", channels]
    out = "emb" if pooled else "fmap"
    graph = helper.make_graph(
        nodes,
        "embedder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        [w],
    )
    return _save(graph, path, {"lookalike.input_size": str(size)})
