"""Tuning a catalog end to end (real photos, real torch training, the tuned model served by ONNX
Runtime), stopping it half-way, and model fingerprints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx_builders import conv_embedder

from lookalike import Catalog
from lookalike.errors import LookalikeError
from lookalike.sources import Item

pytest.importorskip("torch")
TINY = {"views": "4", "epochs": "10", "tail_from": "14", "batch": "16", "dim": "64", "lr": "0.003"}


def separation(cat: Catalog) -> float:
    """Mean cosine between photos of the same product minus mean cosine between different products."""
    keys = sorted(cat.records.known())
    vectors = np.stack([cat.embed(image) for _, image in keys])
    sim = vectors @ vectors.T
    same = np.array([[a[0] == b[0] for b in keys] for a in keys])
    off = ~np.eye(len(keys), dtype=bool)
    return float(sim[same & off].mean() - sim[~same].mean())


@pytest.fixture()
def tiny_catalog(tmp_path, sneaker_folder) -> Path:
    items = [
        Item(p.name, str(img)) for p in sorted(sneaker_folder.iterdir())[:4] for img in sorted(p.glob("*.jpg"))[:4]
    ]
    with Catalog.open(tmp_path / "cat", create=True) as cat:
        cat.index(items, source_name="test")
    return tmp_path / "cat"


def test_tuning_separates_the_catalogs_products_better(tiny_catalog):
    with Catalog.open(tiny_catalog) as cat:
        before = separation(cat)
        report = cat.tune(TINY)
        after = separation(cat)
        info = cat.info()
    print(f"separation {before:.3f} -> {after:.3f}; {report['seconds_training']:.1f} s training")
    assert after > before + 0.05
    model = Path(report["model"])
    assert model.parent == tiny_catalog.resolve() / "models" and model.is_file()
    assert info["config"]["embedder"] == f"models/{model.name}"  # stored relative to the catalog
    assert info["dim"] == 64 + 1280  # tuned part + the untuned vector kept beside it
    moved = tiny_catalog.parent / "moved"
    shutil.move(tiny_catalog, moved)  # the tuned model travels with the catalog
    with Catalog.open(moved) as cat:
        image = sorted(cat.records.known())[0]
        top = cat.search(image[1], k=1).results[0]
        assert top.product_id == image[0] and top.score == pytest.approx(1.0, abs=1e-4)


def test_tuning_learns_from_feedback_photos_cropped_as_searched(tiny_catalog, sneaker_folder, tmp_path):
    """Clicks on logged searches and imported labelled photos are tuning data; feedback on a product
    removed since is left out; with none, tuning runs as before (the test above)."""
    products = sorted(sneaker_folder.iterdir())[:5]
    with Catalog.open(tiny_catalog) as cat:
        cat.log.keep(7)
        for product in products[:3]:
            result = cat.search(sorted(product.glob("*.jpg"))[5], k=4, log=True)  # a photo the catalog lacks
            cat.feedback(result.search_id, result.results[0].product_id, "click")
        manifest = tmp_path / "reviews.csv"
        manifest.write_text(f"photo,product_id\n{sorted(products[3].glob('*.jpg'))[6]},{products[3].name}\n")
        assert cat.import_feedback(manifest).imported == 1
        cat.remove([products[3].name])
        report = cat.tune({**TINY, "feedback_trust": "0.2", "feedback_cap": "2"})  # the guards' code runs too
    assert report["feedback_photos"] == 3 and report["images"] == 12 + 3  # the removed product's photo left out


def test_one_products_feedback_is_capped():
    from lookalike.tune import _feedback_weights

    labels = np.repeat(np.array([0, 0, 0, 1, 1, 1, 1, 1, 2]), 2)  # 2 views a photo
    shopper = np.repeat(np.array([True, False, False, True, True, True, True, False, True]), 2)
    weights = _feedback_weights(labels, shopper, cap=2, views=2)
    assert weights.tolist() == [1, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1, 1, 1, 1]


def test_stopping_tuning_half_way_leaves_the_catalog_as_it_was(tiny_catalog):
    with Catalog.open(tiny_catalog) as cat:
        config, vectors = cat.info()["config"], cat.records.vectors().copy()

        def interrupt(stage: str, done: int, total: int | None) -> None:
            if stage == "re-embedding":
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            cat.tune(TINY, progress=interrupt)
        assert cat.info()["config"] == config
    with Catalog.open(tiny_catalog) as cat:
        assert cat.info()["config"] == config and np.array_equal(cat.records.vectors(), vectors)
    assert not list((tiny_catalog / "models").glob("*.onnx"))  # the unfinished model is not left behind


def test_a_tuned_embedder_is_quantized_the_same_way(tiny_catalog):
    """int8 after tuning: the catalog's tuned model (its projection and the kept untuned half) is what
    gets quantized, and its int8 vectors stay close to the tuned ones."""
    with Catalog.open(tiny_catalog) as cat:
        cat.tune(TINY)
        tuned = cat.info()["config"]["embedder"]
        keys = sorted(cat.records.known())
        before = np.stack([cat.embed(image) for _, image in keys])
        made = cat.quantize(("embedder",))
        assert cat.info()["config"]["embedder"] != tuned and "int8-embedder" in made["embedder"]
        after = np.stack([cat.embed(image) for _, image in keys])
        assert after.shape == before.shape and 0.9 < float(np.mean(np.sum(before * after, axis=1))) < 0.99999
        assert sum(cat.search(image, k=1).results[0].product_id == p for p, image in keys) >= len(keys) - 1


def test_a_changed_model_file_is_refused_until_reindexed(tmp_path, sneaker_folder):
    embedder = conv_embedder(tmp_path / "emb.onnx", pooled=False, seed=1)
    items = [Item(p.name, str(next(p.glob("*.jpg")))) for p in sorted(sneaker_folder.iterdir())[:3]]
    from lookalike.pipeline import PipelineConfig

    with Catalog.open(tmp_path / "cat", PipelineConfig(embedder=str(embedder), whiten=0), create=True) as cat:
        cat.index(items, source_name="test")
    conv_embedder(embedder, pooled=False, seed=2)  # same path, other weights
    with pytest.raises(LookalikeError, match="reindex"):
        Catalog.open(tmp_path / "cat")
    proc = subprocess.run([sys.executable, "-m", "lookalike.cli", "search", items[0].image, "--catalog",
                           str(tmp_path / "cat")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "lookalike reindex --catalog" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lookalike.cli", "reindex", "--catalog", str(tmp_path / "cat"), "-q"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "re-embedded 3 image(s)" in proc.stdout
    with Catalog.open(tmp_path / "cat") as cat:
        assert cat.search(items[1].image, k=1).results[0].product_id == items[1].product_id
        recorded = json.loads(cat.records.get_meta("models"))
        assert recorded["embedder"] == cat.encoder.model_fingerprints()["embedder"]


def test_a_catalog_that_recorded_file_hashes_keeps_working(tmp_path, sneaker_folder):
    """Catalogs made before fingerprints recorded each model file's sha256: the same file, or an earlier
    version of the same model listed beside it, is accepted and its fingerprint recorded in its place; a
    file with another sha256 and other weights is refused."""
    from lookalike import models
    from lookalike.pipeline import PipelineConfig

    embedder = conv_embedder(tmp_path / "emb.onnx", pooled=False, seed=1)
    items = [Item(p.name, str(next(p.glob("*.jpg")))) for p in sorted(sneaker_folder.iterdir())[:2]]
    with Catalog.open(tmp_path / "cat", PipelineConfig(embedder=str(embedder), whiten=0), create=True) as cat:
        cat.index(items, source_name="test")
        fingerprints = cat.encoder.model_fingerprints()
        files = cat.encoder.model_files()
        cat.records.set_meta("models", json.dumps({k: models.sha256_file(v) for k, v in files.items()}))
    with Catalog.open(tmp_path / "cat") as cat:
        assert json.loads(cat.records.get_meta("models")) == fingerprints
        # an earlier version of the same model beside it, in the folder's manifest (as v2 of the embedder
        # is beside v3 in a model cache): other bytes (no node names), the same computation
        import onnx

        earlier = onnx.load(str(embedder))
        for node in earlier.graph.node:
            node.name = ""
        onnx.save(earlier, str(tmp_path / "emb_v0.onnx"))
        old_sha = models.sha256_file(tmp_path / "emb_v0.onnx")
        assert old_sha != models.sha256_file(embedder)
        (tmp_path / models.MANIFEST).write_text(json.dumps({"emb_v0.onnx": old_sha}))
        cat.records.set_meta("models", json.dumps({**fingerprints, "embedder": old_sha}))
    with Catalog.open(tmp_path / "cat") as cat:
        assert json.loads(cat.records.get_meta("models")) == fingerprints
        cat.records.set_meta("models", json.dumps({**fingerprints, "embedder": models.sha256_file(embedder)}))
    conv_embedder(embedder, pooled=False, seed=2)
    with pytest.raises(LookalikeError, match="reindex"):
        Catalog.open(tmp_path / "cat")


def test_tuning_through_the_api_reports_progress(tiny_catalog):
    import time

    from fastapi.testclient import TestClient

    from lookalike.api import ApiSettings, create_app

    auth = {"Authorization": "Bearer t"}
    with Catalog.open(tiny_catalog) as cat:
        photo = open(sorted(cat.records.known())[0][1], "rb").read()
    with TestClient(create_app(tiny_catalog, ApiSettings(token="t"))) as client:
        assert client.post("/tune", json={"options": {"epochs": 2}}).status_code == 401
        assert client.post("/tune", headers=auth, json={"options": {"nope": 1}}).status_code == 400
        r = client.post("/tune", headers=auth, json={"options": TINY})
        assert r.status_code == 202 and r.json()["state"] == "running"
        assert client.post("/tune", headers=auth, json={}).status_code == 409  # one job at a time
        stages = set()
        deadline = time.time() + 300
        while (status := client.get("/tune").json())["state"] == "running" and time.time() < deadline:
            stages.add(status["stage"])
            assert client.post("/search", files={"image": ("q.jpg", photo)}).status_code == 200  # served meanwhile
            time.sleep(0.5)
        assert status["state"] == "done", status
        assert {"views", "training"} & stages and status["result"]["model"].endswith(".onnx")
        assert client.get("/stats").json()["dim"] == 64 + 1280


def test_eval_tunes_only_on_the_rows_it_is_told(tmp_path, sneaker_folder):
    """Open set through the command line: tune on 3 products' photos, evaluate on 3 others."""
    products = sorted(sneaker_folder.iterdir())[:6]
    lines = ["file,product,half"] + [f"{img},{p.name},{1 + i // 3}" for i, p in enumerate(products)
                                     for img in sorted(p.glob("*.jpg"))[:4]]  # fmt: skip
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    args = [sys.executable, "-m", "lookalike.cli", "eval", str(tmp_path / "labels.csv"), "--root", "/", "--label",
            "product", "--query", "half=2", "--gallery", "half=2", "--tune-on", "half=1", "--cache",
            str(tmp_path / "eval.db"), "--json", str(tmp_path / "out.json"), "-q"]  # fmt: skip
    for key, value in TINY.items():
        args += ["--tune-option", f"{key}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["queries"] == 12 and result["config"]["embedder"].startswith(str(tmp_path / "tuned"))
    (model,) = (tmp_path / "tuned").glob("tuned-*.onnx")
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)  # cached: not tuned twice
    assert again.returncode == 0 and list((tmp_path / "tuned").glob("tuned-*.onnx")) == [model]


def _catalog_shot(white_shoe: bool = True):
    """A synthetic catalog shot: a shoe-like shape on white, with a white panel inside it."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (288, 288), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle((40, 120, 200, 200), 20, fill=(30, 60, 160), outline=(20, 20, 20), width=4)
    if white_shoe:
        draw.rectangle((80, 140, 160, 180), fill=(255, 255, 255))  # white inside the shoe, not connected outside
    return img


def test_the_shoe_cut_out_keeps_its_own_white_parts_and_no_halo():
    from lookalike.tune import _shoe_mask

    mask = np.asarray(_shoe_mask(_catalog_shot()))
    assert mask[160, 120] == 255  # the white panel inside the shoe belongs to the shoe
    assert mask[10, 10] == 0 and mask[160, 230] == 0  # the white around it does not
    assert mask[160, 206] < 128  # a few pixels outside the outline: no white rim is carried along


def test_pair_and_leg_views_look_like_worn_photos():
    import random

    from lookalike.tune import _leg, _pair, augment

    shot = _catalog_shot()
    from PIL import ImageDraw

    ImageDraw.Draw(shot).rectangle((50, 125, 62, 137), fill=(230, 0, 0))  # a red mark at the toe

    def marks(img) -> int:  # how many separate red marks, counted along x
        a = np.asarray(img).astype(int)
        cols = ((a[..., 0] > 150) & (a[..., 1] < 80) & (a[..., 2] < 80)).any(axis=0)
        return int((cols[1:] & ~cols[:-1]).sum() + cols[0])

    assert marks(shot) == 1
    views = [_pair(shot, random.Random(seed)) for seed in range(8)]
    assert all(v.size == (288, 288) for v in views)
    assert sum(marks(v) == 2 for v in views) >= 6  # two shoes (the mark hidden behind the other at times)
    legged = np.asarray(_leg(shot.copy(), random.Random(1)))
    top = (np.abs(legged[:20].astype(int) - 255).sum(axis=2) > 30).mean()
    assert top > 0.2  # something comes down from the top edge
    views = [augment(shot, random.Random(s), 160, [], pairs=1.0, legs=1.0) for s in range(4)]
    assert all(v.size == (160, 160) and v.mode == "RGB" for v in views)


def test_the_default_backgrounds_ship_with_the_package():
    """Floor photos (clothing_small_shoes, CC0) are tuning's default backgrounds: inside the package, and
    declared as package data so a wheel carries them."""
    import tomllib

    from lookalike.tune import TuneOptions, _backgrounds

    photos = _backgrounds(TuneOptions().backgrounds)
    assert len(photos) == 297 and all(p.parent.name == "backgrounds" for p in photos)
    assert "CC0" in (photos[0].parent / "LICENSE").read_text()
    assert _backgrounds("none") == []
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "backgrounds/*.jpg" in project["tool"]["setuptools"]["package-data"]["lookalike"]
