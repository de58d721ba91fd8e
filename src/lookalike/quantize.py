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
    GeM power of 3 amplifies it); they are a small share of the compute (BENCHMARKS.md). Nodes are
    followed by position, not by name (a graph may leave names empty); every node must be named for
    ONNX Runtime to exclude it, which `name_nodes` sees to."""
    producer = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    keep, todo, seen = [], [o.name for o in model.graph.output], set()
    while todo:
        i = producer.get(todo.pop())
        if i is None or i in seen:
            continue
        seen.add(i)
        node = model.graph.node[i]
        keep.append(node.name)
        if node.op_type not in LAYERS:
            todo += list(node.input)
    return keep


def name_nodes(model) -> int:
    """Give every unnamed node a unique name (from its first output): ONNX Runtime's quantizer excludes
    and reports nodes by name, and an empty name stands for all of them. Returns how many were named."""
    taken = {node.name for node in model.graph.node if node.name}
    named = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}:{node.output[0] if node.output else i}"
            while name in taken:
                name += f"#{i}"
            node.name = name
            taken.add(name)
            named += 1
    return named


def quantized_nodes(model) -> int:
    """How many tensors the int8 model quantizes (its QuantizeLinear nodes): 0 means it is the float
    model under another name."""
    return sum(node.op_type == "QuantizeLinear" for node in model.graph.node)


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
    name_nodes(model)
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
        if not quantized_nodes(out):
            raise LookalikeError(f"int8 {src.name}: ONNX Runtime quantized none of its layers; nothing written")
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
