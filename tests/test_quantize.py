"""int8 models end to end: quantized with ONNX Runtime's tools, calibrated on the catalog's own
photos, saved inside the catalog, every vector rebuilt with them, and searched."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from lookalike import Catalog
from lookalike.errors import LookalikeError
from lookalike.sources import Item


@pytest.fixture()
def small_catalog(tmp_path, sneaker_folder):
    items = [
        Item(p.name, str(img)) for p in sorted(sneaker_folder.iterdir())[:6] for img in sorted(p.glob("*.jpg"))[:4]
    ]
    with Catalog.open(tmp_path / "cat", create=True) as cat:
        cat.index(items, source_name="test")
    return tmp_path / "cat", items


def test_quantize_runs_int8_models_made_from_the_catalogs_photos(small_catalog):
    directory, items = small_catalog
    with Catalog.open(directory) as cat:
        before = {img: cat.embed(img) for _, img in sorted(cat.records.known())}
        float_boxes = cat.detect(items[0].image).boxes
    out = subprocess.run([sys.executable, "-m", "lookalike.cli", "quantize", "--catalog", str(directory), "-q"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "WARNING" not in out.stdout + out.stderr and "re-embedded 24 images" in out.stdout
    with Catalog.open(directory) as cat:  # reopens: the recorded fingerprints are the int8 files'
        config = cat.info()["config"]
        for name in ("detector", "embedder"):
            assert config[name].startswith("models/int8-"), config
            model = onnx.load(str(directory / config[name]))
            assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
            meta = {p.key: p.value for p in model.metadata_props}
            assert meta["lookalike.int8_of"] and meta["lookalike.kind"]  # read as the float model was
        assert set(json.loads(cat.records.get_meta("models"))) == {"detector", "embedder"}
        # int8 vectors are close to the float ones, not equal (a real approximation), and searches work
        after = {img: cat.embed(img) for img in before}
        cosines = [float(before[i] @ after[i]) for i in before]
        assert 0.9 < np.mean(cosines) < 0.99999, cosines
        assert sum(cat.search(img, k=1).results[0].product_id == pid for pid, img in sorted(cat.records.known())) >= 22
        boxes = cat.detect(items[0].image).boxes
        assert len(boxes) >= 1 and len(float_boxes) >= 1
        with pytest.raises(LookalikeError, match="int8 already"):
            cat.quantize(("embedder",))
        with pytest.raises(LookalikeError, match="expected detector and/or embedder"):
            cat.quantize(("trunk",))


def test_quantize_names_unnamed_nodes_and_refuses_a_model_it_left_float(tmp_path):
    """A graph whose nodes have no names (as the onnx-built embedder had) is quantized all the same; a
    model in which nothing could be quantized is refused and nothing is written."""
    from onnx import TensorProto, helper, numpy_helper

    from lookalike.quantize import quantize

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(8, 8, 3, 3)).astype(np.float32), "w2")]  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"]), helper.make_node("Relu", ["c2"], ["y"])]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])
    graph = helper.make_graph(
        nodes, "two_convs", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "two.onnx"))
    calibration = [rng.normal(size=(1, 3, 16, 16)).astype(np.float32) for _ in range(4)]
    quantize(tmp_path / "two.onnx", tmp_path / "two-int8.onnx", "x", calibration)
    int8 = onnx.load(str(tmp_path / "two-int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    assert not any(n.op_type == "Conv" and n.input[0] == "x" for n in int8.graph.node)  # the first conv is int8

    from onnx_builders import conv_embedder

    one = conv_embedder(tmp_path / "one.onnx", pooled=False, size=16)  # one conv: the float output layer
    with pytest.raises(LookalikeError, match="quantized none"):
        quantize(one, tmp_path / "one-int8.onnx", "x", calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.onnx", "two-int8.onnx", "two.onnx"]
