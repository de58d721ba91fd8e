"""The API as users run it: `lookalike serve` (uvicorn) on a loopback port, in another process."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import API_TOKEN, start_api_server

from lookalike import Catalog

TOKEN = API_TOKEN
AUTH = {"Authorization": f"Bearer {TOKEN}"}
start_server = start_api_server


@pytest.fixture()
def writable_catalog(tmp_path, branded_catalog) -> Path:
    target = tmp_path / "cat"
    shutil.copytree(branded_catalog, target)
    return target


def test_real_server_search_and_write(writable_catalog, tmp_path):
    proc, url = start_server(writable_catalog, tmp_path / "server.log")
    try:
        with Catalog.open(writable_catalog) as cat:
            product_id, image = cat.examples(1)[0]
        data = Path(image).read_bytes()
        r = httpx.post(url + "/search", files={"image": ("q.jpg", data)}, data={"k": "5"}, timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["product_id"] == product_id
        r = httpx.post(url + "/search", json={"url": f"{url}/products/{product_id}/image/0"}, timeout=30)
        assert r.status_code == 400 and "non-public" in r.json()["error"]  # the server refuses to fetch itself
        r = httpx.post(url + "/products", headers=AUTH, data={"product_id": "added"},
                       files=[("images", ("a.jpg", data))], timeout=30)  # fmt: skip
        assert r.status_code == 201
        assert httpx.get(url + "/products/added", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sigkill_during_writes_loses_no_acknowledged_write(writable_catalog, tmp_path):
    log = tmp_path / "server.log"
    proc, url = start_server(writable_catalog, log)
    with Catalog.open(writable_catalog) as cat:
        images = [Path(img).read_bytes() for _, img in cat.examples(6)]
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer(worker: int):
        n = 0
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                pid = f"w{worker}-{n}"
                try:
                    r = client.post(url + "/products", headers=AUTH, data={"product_id": pid},
                                    files=[("images", ("a.jpg", images[n % len(images)]))])  # fmt: skip
                except httpx.HTTPError:
                    return  # the server died mid-request: this write was never acknowledged
                if r.status_code == 201:
                    acknowledged.append(pid)
                n += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while len(acknowledged) < 15 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    assert len(acknowledged) >= 15

    with sqlite3.connect(writable_catalog / "catalog.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    proc, url = start_server(writable_catalog, log)
    try:
        for pid in acknowledged:
            assert httpx.get(f"{url}/products/{pid}", timeout=10).status_code == 200, pid
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["products"] >= 6 + len(acknowledged)
        r = httpx.post(url + "/search", files={"image": ("q.jpg", images[0])}, data={"k": "3"}, timeout=30)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
