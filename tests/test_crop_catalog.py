"""Cropping rules and catalog sources."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from lookalike.crop import CropConfig, choose_crop, union_box
from lookalike.detect import Box
from lookalike.sources import Item, SourceProblem, iter_source


def test_union_keeps_boxes_at_half_the_best_score():
    boxes = [
        Box(10, 10, 20, 20, 0.8, "Footwear"),
        Box(30, 5, 40, 25, 0.5, "Boot"),
        Box(0, 0, 5, 5, 0.3, "Footwear"),
    ]
    u = union_box(boxes, 0.5)
    assert (u.x1, u.y1, u.x2, u.y2, u.score, u.label) == (10, 5, 40, 25, 0.8, "Footwear")


def test_detector_crop_is_square_with_margin():
    img = Image.new("RGB", (200, 100), "black")
    crop = choose_crop(img, [Box(50, 20, 150, 60, 0.9, "Footwear")], CropConfig(margin=0.1))
    assert crop.path == "detector" and crop.box.x1 == 50
    assert crop.image.size == (120, 120)  # 100 + 2*10 wide, padded to a square
    arr = np.asarray(crop.image)
    assert (arr[0, 60] == 255).all() and (arr[60, 60] == 0).all()  # white padding, black content


def test_fallbacks_nonwhite_then_whole():
    img = Image.new("RGB", (100, 100), "white")
    ImageDraw.Draw(img).rectangle([20, 30, 59, 49], fill="red")
    crop = choose_crop(img, [], CropConfig(margin=0))
    assert crop.path == "nonwhite"
    assert (round(crop.box.x1), round(crop.box.y1), round(crop.box.x2), round(crop.box.y2)) == (
        20,
        30,
        60,
        50,
    )
    assert crop.image.size == (40, 40)
    assert choose_crop(Image.new("RGB", (80, 40), "white"), [], CropConfig()).path == "whole"
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 200, (50, 60, 3), dtype=np.uint8))
    whole = choose_crop(noisy, [], CropConfig())
    assert whole.path == "whole" and whole.image.size == (60, 60)


def test_manual_box_wins():
    img = Image.new("RGB", (100, 100), "white")
    crop = choose_crop(img, [Box(0, 0, 10, 10, 0.9, "Footwear")], CropConfig(), manual=Box(50, 50, 90, 70, 1, "manual"))
    assert crop.path == "manual" and crop.box.x1 == 50


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_folder_source(tmp_path):
    _img(tmp_path / "air_max" / "a.jpg")
    _img(tmp_path / "air_max" / "side" / "b.png")
    _img(tmp_path / "loose.jpg")
    _img(tmp_path / ".hidden" / "c.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    items = list(iter_source(tmp_path))
    assert sorted((i.product_id, i.image.rsplit("/", 1)[1]) for i in items) == [
        ("air_max", "a.jpg"), ("air_max", "b.png"), ("loose", "loose.jpg")
    ]  # fmt: skip


def test_manifests_keep_metadata(tmp_path):
    _img(tmp_path / "imgs" / "1.jpg")
    (tmp_path / "m.csv").write_text(
        "product_id,image,brand,price\np1,imgs/1.jpg,Nike,99.5\n,imgs/1.jpg,x,1\np2,https://shop.example/2.jpg,Vans,\n"
    )
    out = list(iter_source(tmp_path / "m.csv"))
    items = [o for o in out if isinstance(o, Item)]
    (problem,) = [o for o in out if isinstance(o, SourceProblem)]
    assert items[0] == Item("p1", str(tmp_path / "imgs" / "1.jpg"), {"brand": "Nike", "price": "99.5"})
    assert problem.where.endswith("m.csv:3") and "product_id" in problem.reason
    assert items[1] == Item("p2", "https://shop.example/2.jpg", {"brand": "Vans"})

    lines = [json.dumps({"product_id": "p1", "image": "imgs/1.jpg", "colour": "red"}), "{broken", "[1]"]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    out = list(iter_source(tmp_path / "m.jsonl"))
    assert [o.metadata for o in out if isinstance(o, Item)] == [{"colour": "red"}]
    assert sorted(o.where[-1] for o in out if isinstance(o, SourceProblem)) == ["2", "3"]

    table = pa.table({"product_id": ["p1"], "image": ["imgs/1.jpg"], "price": [12.0]})
    pq.write_table(table, tmp_path / "m.parquet")
    (item,) = iter_source(tmp_path / "m.parquet")
    assert item.metadata == {"price": 12.0} and item.image.endswith("imgs/1.jpg")


def test_plain_shots_skip_the_detector_only_when_asked(tmp_path):
    """crop.plain: a product shot on white (sneakers50's catalog scene) is cropped to its non-white box
    without the detector; a shopper's photo still goes through it; off by default."""
    from conftest import dataset_path, rows

    from lookalike import Catalog
    from lookalike.config import PipelineConfig

    s50 = rows("sneakers50")
    shots = [r for r in s50 if r["scene"] == "catalog"][:6]
    wild = [r for r in s50 if r["scene"] == "wild"][:4]
    items = [Item(r["product"], str(dataset_path("sneakers50", r))) for r in shots + wild]
    plain = PipelineConfig().with_options({"crop.plain": "1"})
    with Catalog.open(tmp_path / "plain", config=plain, create=True) as cat:
        report = cat.index(items, source_name="t")
    assert report.crops.get("nonwhite", 0) >= 5 and report.crops.get("detector", 0) >= 3
    with Catalog.open(tmp_path / "default", create=True) as cat:
        report = cat.index(items, source_name="t")
    assert report.crops.get("nonwhite", 0) <= 1  # the detector finds the shoes on white too
