"""Issue 9: odd files, broken manifests, two writers on one catalog and hostile addresses lose
nothing and stop nothing. Real models, a real SQLite file, real files on disk."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lookalike import Catalog
from lookalike.errors import BadImageError, LookalikeError
from lookalike.images import Limits, fetch_url, is_public, read_bytes


def cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lookalike.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)  # fmt: skip


def shoes(sneaker_folder: Path, n_products: int, per_product: int = 2) -> list[tuple[str, Path]]:
    return [(p.name, img) for p in sorted(sneaker_folder.iterdir())[:n_products]
            for img in sorted(p.glob("*.jpg"))[:per_product]]  # fmt: skip


# -- point 3: ownership of products by source ---------------------------------------------------
def test_index_prunes_only_its_own_source(tmp_path, sneaker_folder):
    folder = tmp_path / "shop"
    for product, img in shoes(sneaker_folder, 3):
        (folder / product).mkdir(parents=True, exist_ok=True)
        shutil.copy(img, folder / product)
    catalog = tmp_path / "cat"
    assert cli("index", str(folder), "--catalog", str(catalog), "-q").returncode == 0
    upload = shoes(sneaker_folder, 5)[-1][1].read_bytes()
    with Catalog.open(catalog) as cat:
        cat.add_product("from-api", [upload], {"brand": "Api"})
        cat.add_product("from-api-too", [upload])  # same bytes: one stored file, two products
        stored = Path(cat.product("from-api")["images"][0])
        assert stored.is_file() and stored.parent.parent == catalog.resolve() / "uploads"

    gone = sorted(folder.iterdir())[0]
    shutil.rmtree(gone)
    dry = cli("index", str(folder), "--catalog", str(catalog), "--dry-run", "--json", "-q")
    report = json.loads(dry.stdout)
    assert report["dry_run"] and report["removed"] == 2
    assert {p["product_id"] for p in report["pruned"]} == {gone.name}
    with Catalog.open(catalog) as cat:
        assert cat.product(gone.name) is not None  # a dry run writes nothing
    text = cli("index", str(folder), "--catalog", str(catalog), "--dry-run")
    assert f"would remove {gone.name}" in text.stdout and "nothing was written" in text.stdout

    real = json.loads(cli("index", str(folder), "--catalog", str(catalog), "--json", "-q").stdout)
    assert real["removed"] == 2 and real["unchanged"] == 4
    with Catalog.open(catalog) as cat:
        assert cat.product(gone.name) is None
        assert cat.product("from-api") is not None and cat.product("from-api-too") is not None
        assert cat.remove(["from-api"]) == 1
        assert stored.is_file()  # still used by from-api-too
        assert cat.remove(["from-api-too"]) == 1
        assert not stored.exists()  # deleting the last product that has it deletes the upload


def test_replacing_a_product_deletes_its_old_upload(tmp_path, sneaker_folder):
    (a, img_a), (_, img_b) = shoes(sneaker_folder, 1)
    with Catalog.open(tmp_path / "cat", create=True) as cat:
        cat.add_product(a, [img_a.read_bytes()])
        old = Path(cat.product(a)["images"][0])
        cat.add_product(a, [img_b.read_bytes()])
        assert not old.exists() and Path(cat.product(a)["images"][0]).is_file()


# -- point 5: catalog-relative paths --------------------------------------------------------------
def test_relative_catalog_paths_work_from_anywhere(tmp_path, sneaker_folder, monkeypatch):
    (product, img), *_ = shoes(sneaker_folder, 1)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with Catalog.open("rel/cat", create=True) as cat:
        cat.add_product(product, [img.read_bytes()])
    with sqlite3.connect(tmp_path / "work" / "rel" / "cat" / "catalog.db") as db:
        (stored,) = db.execute("SELECT image FROM images").fetchone()
    assert stored.startswith("uploads/")  # relative to the catalog, not to the working directory
    monkeypatch.chdir(tmp_path)
    with Catalog.open(tmp_path / "work" / "rel" / "cat") as cat:
        (path,) = cat.product(product)["images"]
        assert Path(path).is_file()
        assert cat.search(img.read_bytes(), k=1).results[0].product_id == product


# -- points 6-9: bad inputs are reported by name and the run goes on ------------------------------
def test_odd_files_are_reported_and_the_run_goes_on(tmp_path, sneaker_folder):
    folder = tmp_path / "odd"
    (folder / "good").mkdir(parents=True)
    (_, img), (_, img2) = shoes(sneaker_folder, 1)
    shutil.copy(img, folder / "good" / "a.jpg")
    Image.open(img2).save(folder / "good" / "b.avif")  # Pillow here reads AVIF: indexed, not skipped
    os.makedirs(os.fsencode(folder) + b"/bad\xffname")
    for name in (b"/bad\xffname/x.jpg", b"/good/\xfe.jpg"):
        with open(os.fsencode(folder) + name, "wb") as f:
            f.write(img.read_bytes())
    (folder / "good" / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    os.mkfifo(folder / "good" / "pipe.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "good" / "up").symlink_to(folder)  # a folder link back up the tree
    proc = cli("index", str(folder), "--catalog", str(tmp_path / "cat"), "--json", "-q", timeout=300)
    assert proc.returncode == 3, proc.stderr  # finished, some inputs skipped
    report = json.loads(proc.stdout)
    assert report["added"] == 2  # a.jpg and b.avif
    reasons = {f["image"].rsplit("/", 1)[-1]: f["reason"] for f in report["failed"]}
    assert "not valid UTF-8" in reasons["bad\\xffname"] and "not valid UTF-8" in reasons["\\xfe.jpg"]
    assert "cannot be read here" in reasons["photo.heic"]
    assert "not a regular file" in reasons["pipe.jpg"]
    assert "symbolic link loop" in reasons["loop.jpg"] and "symbolic link loop" in reasons["up"]
    assert "skipped" in proc.stderr and "Traceback" not in proc.stderr


def test_broken_manifest_rows_are_reported(tmp_path, sneaker_folder):
    (p1, img1), (_, img2), (p2, img3), _ = shoes(sneaker_folder, 2)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 200_000)
    os.mkfifo(tmp_path / "fifo.jpg")
    lines = [
        "product_id,image,brand,notes",
        f"{p1},{img1},Nike,",
        f"{p1},{img2},Adidas,",  # same product: merged, first brand kept, warned
        f"{p1},{img2},Adidas,",  # the same image twice: used once
        f"huge,{img3},Nike,{'x' * 200_000}",  # a 200 KB field
        "zero,/dev/zero,Nike,",
        f"fifo,{tmp_path / 'fifo.jpg'},Nike,",
        f"big,{big},Nike,",
        f"{p2},{img3},Vans,",
    ]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with Catalog.open(tmp_path / "cat", create=True, limits=Limits(max_bytes=100_000)) as cat:
        report = cat.index(tmp_path / "m.csv")
    assert report.added == 3
    failed = {where.rsplit("/", 1)[-1]: reason for where, reason in report.failed}
    assert "over the 65536 limit" in failed["m.csv:5"] and "notes" in failed["m.csv:5"]
    assert "not a regular file" in failed["zero"] and "not a regular file" in failed["fifo.jpg"]
    assert "over the 100000-byte limit" in failed["big.jpg"]
    merged, twice = report.warnings
    assert p1 in merged[1] and "2 of its 3 rows" in merged[1] and "brand (lines 3, 4)" in merged[1]
    assert "first row" in merged[1]
    assert "listed twice" in twice[1]
    with Catalog.open(tmp_path / "cat") as cat:
        product = cat.product(p1)
        assert len(product["images"]) == 2 and product["metadata"]["brand"] == "Nike"


def test_index_exits_non_zero_when_every_row_was_skipped(tmp_path):
    (tmp_path / "m.csv").write_text("product_id,image\na,/nonexistent/1.jpg\nb,/nonexistent/2.jpg\n")
    proc = cli("index", str(tmp_path / "m.csv"), "--catalog", str(tmp_path / "cat"))
    assert proc.returncode == 3 and "2 skipped" in proc.stdout and "file not found" in proc.stderr


def test_local_reads_are_bounded(tmp_path):
    with pytest.raises(BadImageError, match="not a regular file"):
        read_bytes("/dev/zero")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(BadImageError, match="not a regular file"):
        read_bytes(tmp_path / "pipe")  # returns at once: opened without blocking


@pytest.mark.parametrize("box", ["nan,nan,nan,nan", "inf,0,10,10", "10,10,5,50", "0,0,5000,5000", "-50,0,20,20"])
def test_bad_boxes_are_refused(branded_catalog, box):
    with Catalog.open(branded_catalog) as cat:
        image = cat.examples(1)[0][1]
        from lookalike.pipeline import BoxChoice

        with pytest.raises(LookalikeError, match="box"):
            cat.search(image, box=BoxChoice.parse(box))


# -- point 9: the SSRF guard decides "public unicast", IPv6 forms included -------------------------
@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "::1", "::",
     "::127.0.0.1", "::ffff:127.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1",
     "2002:7f00:1::", "2002:a9fe:a9fe::1", "fec0::1", "fe80::1", "fc00::1", "ff02::1",
     "2001:0:4136:e378:8000:63bf:80ff:fffe"],
)  # fmt: skip
def test_non_public_addresses_are_refused(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1"])
def test_public_addresses_are_allowed(address):
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("host", ["[::127.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "[fec0::1]"])
def test_fetch_refuses_ipv6_forms_of_internal_addresses(host):
    with pytest.raises(BadImageError, match="non-public"):
        fetch_url(f"http://{host}:8080/x.jpg")


def test_slow_drip_fetch_is_cut_at_the_deadline():
    import select
    import socket
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))
    cut_after: list[int] = []

    def drip():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        sent = 0
        try:
            while sent < 20:
                if select.select([conn], [], [], 0)[0] and not conn.recv(1, socket.MSG_PEEK):
                    cut_after.append(sent)  # the client hung up
                    break
                conn.sendall(b"x")
                sent += 1
                time.sleep(0.3)
        except OSError:  # the client hung up while a byte was on its way
            cut_after.append(sent)
        conn.close()

    dripping = threading.Thread(target=drip, daemon=True)
    dripping.start()
    with pytest.raises(BadImageError, match="longer than the 1.5 s limit"):
        fetch_url(f"http://127.0.0.1:{server.getsockname()[1]}/x.jpg", Limits(timeout_s=1.5, allow_private_urls=True))
    dripping.join(timeout=30)
    server.close()
    # the client gave up at its deadline, not when the response ended: the drip had sent only ~5 of its
    # 20 bytes (one each 0.3 s) when the connection was closed on it
    assert len(cut_after) == 1 and 0 <= cut_after[0] < 20, cut_after


# -- point 10: acknowledged writes are fsynced ----------------------------------------------------
def test_writes_are_durable_past_a_power_loss(tmp_path):
    with Catalog.open(tmp_path / "cat", create=True) as cat:
        from lookalike.storage import Storage

        assert isinstance(cat.store, Storage)
        assert cat.store.records.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
