"""The search log and feedback (issue 25): off by default and keeping nothing, purged from disk,
feedback refused when it names no kept search or a product not shown, labelled photos imported row by
row, nothing acknowledged lost to a kill -9, eval never searching with a feedback row."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import API_TOKEN, start_api_server, stop_server

from lookalike import Catalog
from lookalike.errors import FeedbackRefused, LookalikeError

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture()
def catalog(tmp_path, sneaker_catalog) -> Path:
    target = tmp_path / "cat"
    shutil.copytree(sneaker_catalog, target)
    return target


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "lookalike.cli", *args], capture_output=True, text=True,
                          env=env, check=check, timeout=300)  # fmt: skip


def shopper_files(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / "shoppers").glob("*/*") if p.is_file())


def test_the_log_is_off_by_default_and_keeps_nothing(catalog):
    with Catalog.open(catalog) as cat:
        product_id, image = cat.examples(1)[0]
        result = cat.search(image, k=5, log=True)
        assert result.search_id is None and result.to_dict()["search_id"] is None
        assert cat.log.keep_days() == 0 and cat.log.searches() == []
        with pytest.raises(FeedbackRefused, match="no search") as refused:
            cat.feedback("made-up", product_id, "click")
        assert refused.value.missing
    assert not (catalog / "searches.db").exists() and not (catalog / "shoppers").exists()
    assert "search(es) kept" in cli("searches", "list", "--catalog", str(catalog)).stderr


def test_kept_searches_take_feedback_and_purge_deletes_their_files(catalog):
    with Catalog.open(catalog) as cat:
        cat.log.keep(30)
        (_, image), (other, _) = cat.examples(2)
        result = cat.search(image, k=3, log=True)
        assert result.search_id and len(shopper_files(catalog)) == 1
        kept = cat.log.searches()
        assert [r["product_id"] for r in kept[0]["results"]] == [m.product_id for m in result.results]
        used = result.query.box_used
        assert kept[0]["box"] == pytest.approx([used.x1, used.y1, used.x2, used.y2])
        shown = result.results[0].product_id
        not_shown = next(p for p, _ in cat.examples(20) if p not in {m.product_id for m in result.results})
        fid = cat.feedback(result.search_id, shown, "click")
        with pytest.raises(FeedbackRefused, match="not among the results") as refused:
            cat.feedback(result.search_id, not_shown, "purchase")
        assert not refused.value.missing
        with pytest.raises(FeedbackRefused, match="no product"):
            cat.feedback(result.search_id, "no-such-product", "click")
        with pytest.raises(LookalikeError, match="kind"):
            cat.feedback(result.search_id, shown, "like")
        clicked = cat.log.feedback_photos()
        assert [(f.id, f.kind, f.product_id, f.search_id) for f in clicked] == [(fid, "click", shown, result.search_id)]
        assert clicked[0].photo.is_file() and clicked[0].box == pytest.approx(tuple(kept[0]["box"]))
        assert cat.log.purge(time.time() - 3600) == 0  # only older ones
        assert cat.log.purge() == 1
        assert shopper_files(catalog) == [] and cat.log.searches() == [] and cat.log.feedback_photos() == []
        again = cat.search(image, k=3, log=True)  # an old search: expired when the log next looks
        cat.log.keep(1)
    with sqlite3.connect(catalog / "searches.db") as db:
        db.execute("UPDATE searches SET at = at - 2 * 86400 WHERE search_id = ?", (again.search_id,))
    with Catalog.open(catalog) as cat:
        assert cat.log.searches() == [] and shopper_files(catalog) == []
    # overwritten in the file (secure_delete, the write-ahead log truncated), not only unlinked
    assert again.search_id.encode() not in (catalog / "searches.db").read_bytes()
    assert not (catalog / "searches.db-wal").exists() or again.search_id.encode() not in (
        catalog / "searches.db-wal").read_bytes()  # fmt: skip


def test_the_cli_lists_exports_and_purges_searches(catalog, tmp_path):
    assert "kept for 7 days" in cli("searches", "keep", "7", "--catalog", str(catalog)).stdout
    with Catalog.open(catalog) as cat:
        ids = [cat.search(image, k=2, log=True).search_id for _, image in cat.examples(3)]
    listed = cli("searches", "list", "--catalog", str(catalog)).stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ids
    out = tmp_path / "searches.jsonl"
    cli("searches", "export", "--catalog", str(catalog), "--out", str(out))
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["search_id"] for e in exported] == ids and all(Path(e["photo"]).is_file() for e in exported)
    refused = cli("searches", "purge", "--catalog", str(catalog), check=False)
    assert refused.returncode == 2 and "--before DATE or --all" in refused.stderr
    assert "deleted 0" in cli("searches", "purge", "--catalog", str(catalog), "--before", "2020-01-01").stdout
    assert "deleted 3" in cli("searches", "purge", "--catalog", str(catalog), "--all").stdout
    assert shopper_files(catalog) == []


def test_feedback_import_reports_bad_rows_and_goes_on(catalog, tmp_path, sneaker_folder):
    products = sorted(p for p in sneaker_folder.iterdir() if p.is_dir())
    a, b = (sorted(p.glob("*.jpg"))[-1] for p in products[:2])
    manifest = tmp_path / "reviews.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["photo", "product_id", "box"])
        w.writerow([str(a), products[0].name, ""])  # line 2: good
        w.writerow([str(b), products[1].name, "10,10,60,60"])  # line 3: good, with a box
        w.writerow([str(a), "no-such-product", ""])  # line 4
        w.writerow([str(tmp_path / "missing.jpg"), products[0].name, ""])  # line 5
        w.writerow([str(b), products[1].name, "10,10,5000,60"])  # line 6: outside the photo
        w.writerow([str(b), products[1].name, "1,2,3"])  # line 7
        w.writerow(["", products[1].name, ""])  # line 8
    done = cli("feedback", "import", str(manifest), "--catalog", str(catalog), "-q")
    assert "imported 2 labelled photo(s), skipped 5" in done.stdout
    for line, why in ((4, "no product"), (5, "missing.jpg"), (6, "box"), (7, "x1,y1,x2,y2"), (8, "needs both")):
        assert any(f"reviews.csv:{line}" in s and why in s for s in done.stderr.splitlines()), (line, done.stderr)
    listed = cli("feedback", "list", "--catalog", str(catalog)).stdout.splitlines()
    assert len(listed) == 2 and "box 10,10,60,60" in listed[1] and listed[0].split("\t")[1] == "label"
    with Catalog.open(catalog) as cat:
        assert cat.log.keep_days() == 0  # imported photos do not turn the search log on
    assert "removed 2" in cli("feedback", "remove", "--all", "--catalog", str(catalog)).stdout
    assert shopper_files(catalog) == []


def test_the_api_takes_feedback_only_with_the_token_and_on_a_shown_product(catalog, tmp_path):
    proc, url = start_api_server(catalog, tmp_path / "server.log", "--keep-searches", "7")
    try:
        with Catalog.open(catalog, check_models=False) as cat:
            (_, image), *rest = cat.examples(20)
        r = httpx.post(url + "/search", files={"image": ("q.jpg", Path(image).read_bytes())}, data={"k": "1"},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.json()["search_id"]
        search_id, shown = r.json()["search_id"], r.json()["results"][0]["product_id"]
        not_shown = next(p for p, _ in rest if p != shown)
        body = {"search_id": search_id, "product_id": shown, "kind": "purchase"}
        assert httpx.post(url + "/feedback", json=body, timeout=10).status_code == 401
        r = httpx.post(url + "/feedback", json=body, headers=AUTH, timeout=10)
        assert r.status_code == 201 and r.json()["feedback_id"] >= 1 and r.json()["kind"] == "purchase"
        for change, status, words in (({"search_id": "made-up"}, 404, "no search"),
                                      ({"product_id": "no-such-product"}, 404, "no product"),
                                      ({"product_id": not_shown}, 422, "not among the results"),
                                      ({"kind": "like"}, 422, "kind")):  # fmt: skip
            r = httpx.post(url + "/feedback", json={**body, **change}, headers=AUTH, timeout=10)
            assert r.status_code == status and words in r.json()["error"], (change, r.text)
        assert "/feedback" in httpx.get(url + "/openapi.json", timeout=10).json()["paths"]
    finally:
        stop_server(proc)
    with Catalog.open(catalog, check_models=False) as cat:
        assert [(f.kind, f.product_id) for f in cat.log.feedback_photos()] == [("purchase", shown)]


KEEPER = textwrap.dedent("""
    import sys
    from lookalike import Catalog
    with Catalog.open(sys.argv[1]) as cat:
        cat.log.keep(7)
        (product, image), = cat.examples(1)
        first = cat.search(image, k=1, log=True)
        print("search", first.search_id, flush=True)
        while True:
            print("feedback", cat.feedback(first.search_id, first.results[0].product_id, "click"), flush=True)
            print("search", cat.search(image, k=1, log=True).search_id, flush=True)
""")


def test_a_kill_during_logging_and_feedback_loses_nothing_acknowledged(catalog):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", KEEPER, str(catalog)], stdout=subprocess.PIPE, text=True, env=env)
    said: list[str] = []
    for line in proc.stdout:  # killed once it has acknowledged a few of each, mid-way through the next
        said.append(line.split())
        if sum(kind == "feedback" for kind, _ in said) >= 5:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Catalog.open(catalog, check_models=False) as cat:
        kept = cat.log.searches()
        feedback = {str(f.id) for f in cat.log.feedback_photos()}
    assert {v for k, v in said if k == "search"} <= {s["search_id"] for s in kept}
    assert {v for k, v in said if k == "feedback"} <= feedback
    assert all(Path(s["photo"]).is_file() for s in kept)


def test_eval_never_searches_with_a_feedback_row(tmp_path, sneaker_folder):
    from lookalike.eval import evaluate

    rows = [(p.name, img) for p in sorted(sneaker_folder.iterdir())[:3] for img in sorted(p.glob("*.jpg"))[:4]]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "product", "fb"])
        for n, (product, img) in enumerate(rows):
            w.writerow([str(img), product, "1" if n % 4 == 0 else ""])
    cache = tmp_path / "cache.db"
    everything = evaluate(labels, Path("/"), "product", cache_path=cache).metrics
    kept = evaluate(labels, Path("/"), "product", cache_path=cache, never_query="fb=1").metrics
    assert everything["queries"] == 12 and kept["queries"] == 9 and np.isfinite(kept["recall@1"])


def test_the_searches_report_shows_what_shoppers_look_for(tmp_path, branded_catalog):
    from PIL import Image

    catalog = tmp_path / "cat"
    shutil.copytree(branded_catalog, catalog)
    walls = []
    for n, colour in enumerate(((128, 128, 120), (130, 127, 121), (40, 90, 160))):  # two alike, one other
        walls.append(tmp_path / f"wall{n}.png")
        Image.new("RGB", (300, 200), colour).save(walls[-1])
    with Catalog.open(catalog) as cat:
        cat.log.keep(7)
        ((_, shoe),) = cat.examples(1)
        found = cat.search(shoe, k=3, log=True)
        cat.feedback(found.search_id, found.results[0].product_id, "click")
        unanswered = [cat.search(w, k=3, log=True) for w in walls]
    assert not found.no_match and all(u.no_match for u in unanswered)
    out = tmp_path / "report.html"
    assert "4 searches, 3 unanswered" in cli("searches", "report", "--catalog", str(catalog), "--out", str(out)).stdout
    page = out.read_text()
    assert "4 search(es) kept; <b>75.0%</b> answered" in page and "1 click(s)" in page
    assert f'<td>{found.results[0].product_id}</td><td class="num">1</td>' in page
    ctr = page[page.index('id="ctr"') : page.index("</table>", page.index('id="ctr"'))]
    assert '<td class="num">1</td><td class="num">1</td><td class="num">1</td><td class="num">100.0%</td>' in ctr
    gallery = page[page.index('id="unanswered"') :]
    assert gallery.count("<figure>") == 2 and "2 search(es)" in gallery  # the two alike walls: one group
