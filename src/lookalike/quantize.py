"""int8 models: ONNX Runtime's static quantization, calibrated on a catalog's own photos.

QDQ format, int8 weights per output channel, uint8 activations with reduced range: on this AVX2
CPU without VNNI that is the layout that runs faster (int8 activations gave no speed-up at all;
BENCHMARKS.md). Calibration takes the inputs the pipeline itself makes for the model, from photos
a catalog holds, never from queries. Needs the `onnx` package (`lookalike[quantize]`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lookalike.errors import LookalikeError
from lookalike.models import quietly

CALIBRATION_IMAGES = 96  # enough for stable activation ranges (min/max) on this pipeline's inputs
MIN_OPSET = 13  # per-channel DequantizeLinear needs its `axis` attribute


LAYERS = ("Conv", "Gemm", "MatMul")


def output_layers(model) -> list[str]:
    """The nodes from the last weighted layer of each branch to the model's outputs: they stay float.
    Their int8 rounding is what moved the detector's boxes and the embedder's pooled features (the
    GeM power of 3 amplifies it); they are a small share of the compute (BENCHMARKS.md)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    keep, todo, seen = [], [o.name for o in model.graph.output], set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        keep.append(node.name)
        if node.op_type not in LAYERS:
            todo += list(node.input)
    return keep


def quantize(src: Path, dst: Path, input_name: str, inputs: list[np.ndarray]) -> Path:
    """Write the int8 version of the ONNX model `src` to `dst`, its metadata (kind, labels, input
    size, normalisation) kept so lookalike reads it as it reads the float model."""
    try:
        import onnx
        from onnx import version_converter
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise LookalikeError(f"int8 models need the onnx package: pip install 'lookalike[quantize]' ({e})") from None
    if not inputs:
        raise LookalikeError("no calibration images: the catalog has no readable photos")

    class Inputs(CalibrationDataReader):
        def __init__(self) -> None:
            self.rest = iter(inputs)

        def get_next(self) -> dict | None:
            x = next(self.rest, None)
            return None if x is None else {input_name: x}

    model = onnx.load(str(src))
    metadata = {p.key: p.value for p in model.metadata_props}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
    if opset < MIN_OPSET:
        model = version_converter.convert_version(model, MIN_OPSET)
    tmp = [dst.with_name(f".{dst.name}.{os.getpid()}.{n}.onnx") for n in ("float", "prepared", "int8")]
    try:
        with quietly(f"int8 {src.name}"):
            onnx.save(model, str(tmp[0]))
            quant_pre_process(str(tmp[0]), str(tmp[1]))
            float_nodes = output_layers(onnx.load(str(tmp[1])))
            layout = {"quant_format": QuantFormat.QDQ, "per_channel": True, "reduce_range": True,
                      "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8}  # fmt: skip
            quantize_static(str(tmp[1]), str(tmp[2]), Inputs(), nodes_to_exclude=float_nodes, **layout)
        out = onnx.load(str(tmp[2]))
        del out.metadata_props[:]
        for key, value in {**metadata, "lookalike.int8_of": src.name}.items():
            prop = out.metadata_props.add()
            prop.key, prop.value = key, value
        onnx.save(out, str(tmp[2]))
        os.replace(tmp[2], dst)
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)
    return dst
