""" "No close match" (issue 15): a photo with no shoe in it gets that answer, not noise, from the
Python API, the CLI, a real server and the app; photos of catalog products still get theirs. The
threshold is learned from the catalog's own vectors (`calibration.py`)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import start_api_server, stop_server
from PIL import Image

from lookalike import Catalog
from lookalike.calibration import no_match_score


def plain(tmp_path, colour=(128, 128, 120)):
    path = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), colour).save(path)
    return path


def test_no_shoe_gets_no_close_match_everywhere(tmp_path, branded_catalog, monkeypatch):
    wall = plain(tmp_path)
    with Catalog.open(branded_catalog) as cat:
        product, photo = cat.examples(6)[1]
        found = cat.search(photo, k=3)
        empty = cat.search(wall, k=3)
        query = cat.detect(wall)
    assert not found.no_match and found.results[0].product_id == product
    assert empty.no_match and empty.results == [] and empty.threshold is not None
    assert found.results[0].score >= found.threshold > 0.3

    done = subprocess.run([sys.executable, "-m", "lookalike.cli", "search", str(wall), "--catalog",
                           str(branded_catalog), "--json"], capture_output=True, text=True)  # fmt: skip
    answer = json.loads(done.stdout)
    assert answer["no_match"] is True and answer["results"] == [] and answer["threshold"] == round(empty.threshold, 4)
    text = subprocess.run([sys.executable, "-m", "lookalike.cli", "search", str(wall), "--catalog",
                           str(branded_catalog)], capture_output=True, text=True).stdout  # fmt: skip
    assert text.startswith("no close match: nothing in this catalog scores")

    proc, url = start_api_server(branded_catalog, tmp_path / "server.log")
    try:
        r = httpx.post(url + "/search", files={"image": ("wall.png", wall.read_bytes(), "image/png")}, timeout=60)
        assert r.status_code == 200 and r.json()["no_match"] is True and r.json()["results"] == []
        with open(photo, "rb") as f:
            r = httpx.post(url + "/search", files={"image": ("shoe.jpg", f, "image/jpeg")}, timeout=60)
        assert r.json()["no_match"] is False and r.json()["results"][0]["product_id"] == product
    finally:
        stop_server(proc)

    from streamlit.testing.v1 import AppTest

    from lookalike import app

    monkeypatch.setenv("LOOKALIKE_CATALOG", str(branded_catalog))
    at = AppTest.from_file(app.__file__, default_timeout=120)
    at.session_state["query"], at.session_state["query_name"] = query, "wall.png"  # as an upload leaves it
    at.run()
    assert not at.exception and any("No close match" in w.value for w in at.warning)


def test_the_threshold_is_learned_from_different_products_only():
    rng = np.random.default_rng(1)
    centre = rng.normal(size=16)
    vectors = centre + 0.3 * rng.normal(size=(200, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = [f"p{i % 20}" for i in range(200)]
    score = no_match_score(vectors, labels)
    pairs = [float(vectors[i] @ vectors[j]) for i in range(200) for j in range(i) if labels[i] != labels[j]]
    assert abs(score - float(np.median(pairs))) < 0.01  # the median of unrelated pairs
    assert no_match_score(vectors[:4], labels[:4]) is None  # four products: too few to say


def test_the_closest_products_anyway_with_min_score(tmp_path, branded_catalog, monkeypatch):
    """`min_score` shows the products scoring at least that under the threshold, `no_match` still said,
    in Python, the CLI, the API and the app; a bad value is refused by name."""
    from lookalike.errors import LookalikeError

    wall = plain(tmp_path, (90, 110, 140))
    with Catalog.open(branded_catalog) as cat:
        anyway = cat.search(wall, k=4, min_score=0)
        high = cat.search(wall, k=4, min_score=anyway.results[1].score)
        query = cat.detect(wall)
        with pytest.raises(LookalikeError, match="min_score 2.0: expected a number from -1 to 1"):
            cat.search(wall, min_score=2.0)
    assert anyway.no_match and len(anyway.results) == 4 and anyway.results[0].score < anyway.threshold
    assert [m.score for m in anyway.results] == sorted((m.score for m in anyway.results), reverse=True)
    assert high.no_match and [m.product_id for m in high.results] == [m.product_id for m in anyway.results[:2]]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lookalike.cli", "search", str(wall), "--catalog",
                               str(branded_catalog), "-k", "4", *args], capture_output=True, text=True)  # fmt: skip

    answer = json.loads(cli("--min-score", "0", "--json").stdout)
    assert answer["no_match"] is True and [r["product_id"] for r in answer["results"]] == [
        m.product_id for m in anyway.results
    ]
    text = cli("--min-score", "0").stdout.splitlines()
    assert text[0].startswith("no close match") and text[1].startswith("the closest anyway") and len(text) == 7
    assert text[2].startswith("query: ") and [line.split()[2] for line in text[3:]] == [
        m.product_id for m in anyway.results
    ]
    assert "--min-score 0 shows the closest products anyway" in cli().stdout
    bad = cli("--min-score", "3")
    assert bad.returncode == 2 and "min_score 3.0" in bad.stderr and "Traceback" not in bad.stderr

    proc, url = start_api_server(branded_catalog, tmp_path / "server.log")
    try:
        form = {"image": ("wall.png", wall.read_bytes(), "image/png")}
        r = httpx.post(url + "/search", files=form, data={"k": "4", "min_score": "0"}, timeout=60)
        assert r.status_code == 200 and r.json()["no_match"] is True
        assert [m["product_id"] for m in r.json()["results"]] == [m.product_id for m in anyway.results]
        r = httpx.post(url + "/search", files=form, data={"min_score": "1.5"}, timeout=60)
        assert r.status_code == 422 and "min_score" in r.text
    finally:
        stop_server(proc)

    from streamlit.testing.v1 import AppTest

    from lookalike import app

    monkeypatch.setenv("LOOKALIKE_CATALOG", str(branded_catalog))
    at = AppTest.from_file(app.__file__, default_timeout=120)
    at.session_state["query"], at.session_state["query_name"] = query, "wall.png"
    at.run()
    assert not any('class="lookalike-card"' in m.value for m in at.markdown)
    at.sidebar.checkbox(key="anyway").check().run()
    assert not at.exception and any("closest products anyway" in w.value for w in at.warning)
    cards = [m.value for m in at.markdown if 'class="lookalike-card"' in m.value]
    assert len(cards) == 6  # every product of the catalog (k is 12): none scores under -1


def test_a_small_catalog_lowers_the_level():
    from lookalike.calibration import level_for

    assert [level_for(n) for n in (5, 10, 20, 50, 5000)] == pytest.approx([0.3, 0.4, 0.5, 0.5, 0.5])
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(100, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = [f"p{i % 10}" for i in range(100)]
    pairs = np.array([float(vectors[i] @ vectors[j]) for i in range(100) for j in range(i) if labels[i] != labels[j]])
    assert abs(no_match_score(vectors, labels) - np.quantile(pairs, 0.4)) < 0.02
    assert abs(no_match_score(vectors, labels, by_size=False) - np.quantile(pairs, 0.5)) < 0.02
