"""Pipeline options are validated in one place, before anything is written."""

from __future__ import annotations

import json
import sqlite3

import pytest
from onnx_builders import conv_embedder, yolov8_like
from PIL import Image
from test_pipeline import cli

from lookalike import Catalog
from lookalike.config import ConfigError, CropConfig, PipelineConfig
from lookalike.errors import LookalikeError
from lookalike.sources import Item


@pytest.mark.parametrize(
    ("option", "allowed"),
    [
        ("crop.strategy=unoin", "one of union, best, nonwhite, whole"),
        ("embed_size=100", "multiple of 32"),
        ("pooling=foo", "one of avg, gem"),
        ("crop.margin=-1", "from 0 to 1"),
        ("gem_p=nan", "from 1 to 20"),
        ("whiten=-5", "0 (off)"),
        ("flip=maybe", "true or false"),
        ("crop.pad_color=300,0,0", "0 to 255"),
        ("colour=red", "expected one of detector, embedder"),
    ],
)
def test_a_bad_option_is_refused_before_anything_is_written(tmp_path, option, allowed):
    (tmp_path / "src").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "src" / "red.png")
    proc = cli("index", str(tmp_path / "src"), "--catalog", str(tmp_path / "cat"), "--config", option, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    key, value = option.split("=")
    assert len(lines) == 1 and key in lines[0] and value.split(",")[0] in lines[0] and allowed in lines[0], lines
    assert not (tmp_path / "cat").exists()


def test_the_python_api_checks_the_same_way():
    with pytest.raises(ConfigError, match="crop.strategy='unoin'"):
        CropConfig(strategy="unoin")
    with pytest.raises(ConfigError, match="embed_size=100"):
        PipelineConfig(embed_size=100)
    with pytest.raises(ConfigError, match="pooling='foo'"):
        PipelineConfig().with_options({"pooling": "foo"})
    with pytest.raises(LookalikeError, match="unknown configuration option 'colour'"):
        PipelineConfig.from_json(json.dumps({"colour": "red"}))
    assert CropConfig(pad_color=[1, 2, 3]).pad_color == (1, 2, 3)  # a list from JSON is the same setting
    config = PipelineConfig().with_options({"crop.margin": "0.1", "flip": "yes", "embed_size": "224"})
    assert PipelineConfig.from_json(config.to_json()) == config


def _tiny(tmp_path):
    import numpy as np

    det = yolov8_like(tmp_path / "yolo.onnx", np.array([[32, 32, 40, 40, 0.9]], np.float32).T, {0: "Shoe"})
    emb = conv_embedder(tmp_path / "emb.onnx", pooled=False)  # takes 32 x 32 images only
    items = []
    for c in ("red", "green", "blue"):
        Image.new("RGB", (64, 64), c).save(tmp_path / f"{c}.png")
        items.append(Item(c, str(tmp_path / f"{c}.png")))
    return PipelineConfig(detector=str(det), embedder=str(emb)), items


def test_zero_and_the_models_size_are_one_setting(tmp_path):
    config, items = _tiny(tmp_path)
    with Catalog.open(tmp_path / "cat", config=config, create=True) as cat:
        cat.index(items)
        assert cat.info()["config"]["embed_size"] == 32  # recorded as the size it ran at
    with Catalog.open(tmp_path / "cat", config=config) as cat:  # 0 = the model's 32: the same config
        assert cat.info()["images"] == 3
    with pytest.raises(LookalikeError, match="another pipeline configuration"):
        Catalog.open(tmp_path / "cat", config=PipelineConfig(detector=config.detector, embedder=config.embedder,
                                                             embed_size=64))  # fmt: skip
    # a catalog of an older lookalike recorded 0: asking for the model's size explicitly is the same
    db = sqlite3.connect(tmp_path / "cat" / "catalog.db", isolation_level=None)
    db.execute("UPDATE meta SET value=? WHERE key='config'", (config.to_json(),))
    db.close()
    with Catalog.open(tmp_path / "cat", config=PipelineConfig(detector=config.detector, embedder=config.embedder,
                                                              embed_size=32)) as cat:  # fmt: skip
        assert cat.search(tmp_path / "blue.png", k=1).results[0].product_id == "blue"


def test_the_config_is_recorded_only_once_an_image_is_stored(tmp_path):
    config, items = _tiny(tmp_path)
    (tmp_path / "broken.png").write_text("not an image")
    with Catalog.open(tmp_path / "cat", config=config, create=True) as cat:
        report = cat.index([Item("broken", str(tmp_path / "broken.png"))])
        assert len(report.failed) == 1
    db = sqlite3.connect(tmp_path / "cat" / "catalog.db")
    assert db.execute("SELECT value FROM meta WHERE key='config'").fetchone() is None
    db.close()
    other = PipelineConfig(detector=config.detector, embedder=config.embedder, pooling="avg")
    with Catalog.open(tmp_path / "cat", config=other, create=True) as cat:  # not tied to the failed run
        assert cat.index(items).added == 3
        assert cat.info()["config"]["pooling"] == "avg"
