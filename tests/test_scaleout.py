"""Scaling out (issue 14): a catalog whose vectors live in Milvus (Milvus Lite, embedded: the same
client and server protocol as a Milvus server), indexing on a local Ray with two workers, and the
compose file. Real Milvus Lite, real Ray, real models and photos; every face through its own door."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import API_TOKEN, start_api_server, stop_server

from lookalike import Catalog
from lookalike.errors import LookalikeError

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("pymilvus")  # the `milvus` and `ray` extras: in the test environment (requirements.lock)
pytest.importorskip("ray")


def cli(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lookalike.cli", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    if check:
        assert done.returncode in (0, 3), done.stderr
    return done


def top10(catalog: Path, photos: list[Path], where: dict | None = None) -> list[list[str]]:
    with Catalog.open(catalog) as cat:
        return [[m.product_id for m in cat.search(p, k=10, where=where).results] for p in photos]


@pytest.fixture()
def lite(tmp_path, branded_catalog) -> tuple[Path, str, Path]:
    """The branded manifest indexed by the CLI into a catalog whose vectors are in Milvus Lite."""
    catalog, spec = tmp_path / "cat", f"milvus://{tmp_path}/vectors/lite.db"
    manifest = branded_catalog.parent / "manifest.csv"
    done = cli("index", str(manifest), "--catalog", str(catalog), "--store", spec, "-q")
    assert "18 new" in done.stdout
    return catalog, spec, manifest


def test_cli_search_filter_remove_and_reopen_on_milvus_lite(lite, branded_catalog):
    catalog, spec, manifest = lite
    again = cli("index", str(manifest), "--catalog", str(catalog), "-q")  # incremental: nothing to embed
    assert "0 new, 0 changed), 18 unchanged" in again.stdout
    info = json.loads(cli("info", "--catalog", str(catalog), "--json").stdout)
    assert info["store"] == spec and info["index"] == "milvus-flat" and info["images"] == 18
    photos = [Path(line.split(",")[1]) for line in manifest.read_text().splitlines()[1::3]]
    # the same answers as the local store of the same photos (conftest's branded catalog)
    assert top10(catalog, photos) == top10(branded_catalog, photos)
    assert top10(catalog, photos, {"brand": "nike"}) == top10(branded_catalog, photos, {"brand": "nike"})
    found = json.loads(cli("search", str(photos[0]), "--catalog", str(catalog), "--where", "price=0..20",
                           "--json").stdout)  # fmt: skip
    assert found["results"] and all(r["metadata"]["price"] in ("0", "10", "20") for r in found["results"])
    assert found["results"][0]["product_id"] == photos[0].parent.name
    first = photos[0].parent.name
    cli("remove", first, "--catalog", str(catalog))
    again = json.loads(cli("search", str(photos[0]), "--catalog", str(catalog), "--json").stdout)  # a new process
    assert first not in {r["product_id"] for r in again["results"]} and len(again["results"]) == 5
    snapshot = json.loads(next(catalog.glob("milvus-*.json")).read_text())
    assert snapshot["store"] == spec and snapshot["note"]["seq"] >= 3  # the removal is in what it caught up to


def test_migrate_local_to_milvus_and_back_keeps_the_top_10(tmp_path, branded_catalog, caplog):
    catalog = tmp_path / "cat"
    shutil.copytree(branded_catalog, catalog)
    manifest = (branded_catalog.parent / "manifest.csv").read_text().splitlines()[1:]
    photos = sorted({Path(line.split(",")[1]) for line in manifest})
    before = top10(catalog, photos)
    spec = f"milvus://{tmp_path}/lite.db"
    done = cli("store", "migrate", "--catalog", str(catalog), "--to", spec)
    assert f"moved 18 vector(s) from local to {spec}" in done.stdout
    assert top10(catalog, photos) == before
    # no re-embedding: the vectors in SQLite are the very same bytes
    vectors = sqlite3.connect(catalog / "catalog.db").execute("SELECT vector FROM images ORDER BY id").fetchall()
    reference = sqlite3.connect(branded_catalog / "catalog.db").execute("SELECT vector FROM images ORDER BY id")
    assert vectors == reference.fetchall()
    cli("store", "migrate", "--catalog", str(catalog), "--to", "local")
    assert top10(catalog, photos) == before
    assert not list(catalog.glob("milvus-*.json"))  # what Milvus held for it is gone
    with Catalog.open(catalog) as cat:
        assert cat.info()["store"] == "local"
        with pytest.raises(LookalikeError, match="already keeps its vectors in local"):
            cat.migrate("local")


def test_api_and_eval_on_milvus_lite(lite, tmp_path, sneaker_folder):
    catalog, spec, manifest = lite
    photo = Path(manifest.read_text().splitlines()[1].split(",")[1])
    proc, url = start_api_server(catalog, tmp_path / "server.log")  # the server holds the Lite file now
    try:
        with photo.open("rb") as f:
            r = httpx.post(url + "/search", files={"image": ("q.jpg", f, "image/jpeg")}, data={"k": "3"}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["product_id"] == photo.parent.name
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        extra = sorted((sneaker_folder / sorted(p.name for p in sneaker_folder.iterdir())[10]).glob("*.jpg"))[:2]
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in extra]
        r = httpx.post(url + "/products", data={"product_id": "new-one"}, files=files, headers=auth, timeout=60)
        assert r.status_code == 201, r.text
        with extra[0].open("rb") as f:
            r = httpx.post(url + "/search", files={"image": ("q.jpg", f, "image/jpeg")}, timeout=60)
        assert r.json()["results"][0]["product_id"] == "new-one"
        assert httpx.delete(url + "/products/new-one", headers=auth, timeout=60).status_code == 200
        assert httpx.get(url + "/stats", timeout=10).json()["index"] == "milvus-flat"
    finally:
        stop_server(proc)
    # eval through a Milvus Lite store gives the exact evaluation's figures on a small gallery
    labels = tmp_path / "labels.csv"
    rows = [line.split(",") for line in manifest.read_text().splitlines()[1:]]
    labels.write_text("file,product\n" + "".join(f"{r[1]},{r[0]}\n" for r in rows))
    exact = cli("eval", str(labels), "--label", "product", "--json", str(tmp_path / "a.json"), "-q")
    served = cli("eval", str(labels), "--label", "product", "--store", f"milvus://{tmp_path}/eval.db",
                 "--json", str(tmp_path / "b.json"), "-q")  # fmt: skip
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert exact.stdout == served.stdout and a["recall@1"] == b["recall@1"] > 0.5


def test_the_app_on_milvus_lite(lite, monkeypatch):
    from streamlit.testing.v1 import AppTest

    catalog, _, manifest = lite
    monkeypatch.setenv("LOOKALIKE_CATALOG", str(catalog))
    at = AppTest.from_file(str(ROOT / "src" / "lookalike" / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    with Catalog.open(catalog) as cat:
        examples = cat.examples(8)
    at.button(key="example_1").click().run()
    assert not at.exception
    found = sorted(re.findall(r'class="lookalike-card" data-rank="(\d+)" data-product="([^"]+)"',
                              "".join(m.value for m in at.markdown)))  # fmt: skip
    assert found and found[0] == ("1", examples[1][0])  # a catalog photo finds its own product first


@pytest.mark.parametrize(("spec", "reason"), [
    ("milvus://user:secret@db:19530", "give no credentials in the address"),
    ("milvus:///tmp/x/lite.sqlite", "a Milvus Lite file is named milvus:///path/to/file.db"),
    ("milvus://db:19530/extra", "expected milvus://host:port"),
    ("redis://db:6379", "unknown scheme 'redis'"),
    ("milvus", "expected local"),
])  # fmt: skip
def test_a_bad_store_is_refused_by_name_before_anything_is_written(tmp_path, spec, reason):
    done = cli("index", str(tmp_path), "--catalog", str(tmp_path / "cat"), "--store", spec, check=False)
    assert done.returncode == 2 and reason in done.stderr and spec in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cat").exists()


def test_ray_indexing_gives_the_local_catalog_and_the_same_report(tmp_path, sneaker_folder):
    """Two Ray workers on this machine: the same rows (ids, hashes, crops, boxes) and bit-identical
    vectors as the local threads, the same skipped-input lines, and incremental skipping on Ray."""
    source = tmp_path / "source"
    for product in sorted(sneaker_folder.iterdir())[:4]:
        (source / product.name).mkdir(parents=True)
        for photo in sorted(product.glob("*.jpg"))[:6]:
            (source / product.name / photo.name).symlink_to(photo)
    (source / product.name / "broken.jpg").write_bytes(b"not a photo")
    (source / product.name / "empty.jpg").write_bytes(b"")
    local = cli("index", str(source), "--catalog", str(tmp_path / "local"), "-q")
    on_ray = cli("index", str(source), "--catalog", str(tmp_path / "ray"), "--ray", "--workers", "2", "-q")
    assert local.returncode == on_ray.returncode == 3
    skipped = sorted(line for line in local.stderr.splitlines() if line.startswith("skipped"))
    assert len(skipped) == 2 and sorted(on_ray.stderr.strip().splitlines()) == skipped  # nothing else printed
    q = "SELECT id, product_id, image, sha256, vector, crop, box, source FROM images ORDER BY id"
    rows = [sqlite3.connect(tmp_path / name / "catalog.db").execute(q).fetchall() for name in ("local", "ray")]
    assert len(rows[0]) == 24 and rows[0] == rows[1]
    again = cli("index", str(source), "--catalog", str(tmp_path / "ray"), "--ray", "--workers", "2", "--json", "-q")
    report = json.loads(again.stdout)
    assert report["added"] == 0 and report["unchanged"] == 24 and len(report["failed"]) == 2
    vectors = np.stack([np.frombuffer(r[4], dtype=np.float32) for r in rows[1]])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_ray_fetches_a_feed_s_urls_in_a_stage_of_its_own_and_gives_the_local_catalog(tmp_path, sneaker_folder):
    """Issue 26: a Merchant feed of URLs indexed on Ray (its fetch stage before the actors) gives the
    rows and the failure lines the local fetch pool gives; a 503 is tried again there too."""
    from test_feeds import ImageServer, feed_of
    from test_hardening import shoes

    server = ImageServer({f"{p}-{img.name}": img.read_bytes() for p, img in shoes(sneaker_folder, 3)})
    try:
        feed = feed_of(server, tmp_path / "feed.tsv")
        with open(feed, "a") as f:
            f.write(f"gone\tGone\t{server.url}/missing.jpg\t\tmodel-c\t9.00 USD\tBlack\n")
        out = {}
        for name, extra in (("local", ()), ("ray", ("--ray", "--workers", "2"))):
            server.first[sorted(server.files)[1]] = (503, None)
            out[name] = cli("index", str(feed), "--catalog", str(tmp_path / name), "--allow-private-urls", "-q", *extra)
    finally:
        server.close()
    assert out["local"].returncode == out["ray"].returncode == 3
    assert out["ray"].stderr.strip().splitlines() == out["local"].stderr.strip().splitlines()
    assert "missing.jpg" in out["ray"].stderr and "404" in out["ray"].stderr
    q = "SELECT id, product_id, image, sha256, vector, crop, box, source FROM images ORDER BY id"
    rows = [sqlite3.connect(tmp_path / name / "catalog.db").execute(q).fetchall() for name in ("local", "ray")]
    assert len(rows[0]) == 6 and rows[0] == rows[1]
    assert sum(1 for _, n, _ in server.log if n == sorted(server.files)[1]) == 4  # 503, then 200, on each


def test_ray_refuses_a_cluster_it_cannot_join(tmp_path, sneaker_folder):
    done = cli("index", str(sneaker_folder), "--catalog", str(tmp_path / "cat"), "--ray", "ray://127.0.0.1:1",
               check=False, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "ray ray://127.0.0.1:1: cannot start or join Ray" in done.stderr


def test_compose_file_is_valid_and_the_check_would_catch_a_mistake(tmp_path):
    check = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")

    def validate(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([check, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True,
                              text=True)  # fmt: skip

    for name in ("compose.yaml", "compose.milvus.yaml"):
        ok = validate(ROOT / name)
        assert ok.returncode == 0, name + ok.stdout + ok.stderr
    broken = tmp_path / "compose.yaml"
    port = '\n      - "${LOOKALIKE_API_PORT'
    broken.write_text((ROOT / "compose.yaml").read_text().replace("    ports:" + port, "    portz:" + port))
    bad = validate(broken)
    assert bad.returncode == 1 and "portz" in bad.stdout + bad.stderr
