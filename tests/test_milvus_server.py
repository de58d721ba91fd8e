"""A real Milvus server (issue 23): PyPI's `milvus` package runs Milvus 2.3's standalone server binary
with its own etcd and local storage, here with authentication on. Through `milvus://127.0.0.1:PORT`:
index, search, filter, remove, reopen and `store migrate` give the local store's top 10 (IVF_FLAT on a
server: a collection this small is searched exactly, as the local store searches it); the token is
passed and a missing or wrong one is one clear error; a server that goes away mid-run is one clear
error, and nothing in SQLite is lost: once the server is back, the catalog catches up."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lookalike import Catalog

pytest.importorskip("pymilvus")
pytest.importorskip("milvus", reason="the embedded Milvus server (PyPI `milvus`, in the dev extra) is not installed")

TOKEN = "root:Milvus"  # the server's first user, with authentication on


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lookalike.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def top10(catalog: Path, photos: list[Path], where: dict | None = None) -> list[list[str]]:
    with Catalog.open(catalog) as cat:
        return [[m.product_id for m in cat.search(p, k=10, where=where).results] for p in photos]


class Server:
    """The embedded Milvus server in a directory of its own; `stop` and `start` keep its data and port."""

    def __init__(self, directory: Path):
        from milvus import MilvusServer

        self.server = MilvusServer()
        self.server.set_base_dir(str(directory))
        self.server.config.set("authorization_enabled", True)
        # the package checks each port with a plain bind, which a port's TIME_WAIT connections from the
        # last run refuse for a minute; the server's own listeners (Go) set SO_REUSEADDR, and so does this
        self.server.config.try_bind_port = _bound
        self.port: int | None = None

    def start(self) -> Server:
        if self.port:  # started before: the same ports (all of them: one of the others could take the
            # client's port otherwise), once the old process's sockets let go of them
            config = self.server.config
            ports = {k: v[1] for k, v in config.configurable_items.items() if k.endswith("_port")}
            config.configs.update(ports)
            deadline = time.monotonic() + 60
            while not all(map(_free, ports.values())) and time.monotonic() < deadline:
                time.sleep(0.5)
        try:
            self.server.start()
        except Exception as e:  # no binary for this platform, no free port, a sandbox that forbids it
            self.server.stop()
            if self.port:  # it ran before: not starting again is a failure, not a missing capability
                raise
            pytest.skip(f"the embedded Milvus server cannot start here ({type(e).__name__}: {e})")
        self.port = self.server.listen_port
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def spec(self) -> str:
        return f"milvus://127.0.0.1:{self.port}"


def _bound(port: int) -> socket.socket | None:
    """A listening socket on the port (SO_REUSEADDR, as the server's own), or None if it is taken."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def _free(port: int) -> bool:
    sock = _bound(port)
    if sock is not None:
        sock.close()
    return sock is not None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("milvus-server")).start()
    yield running
    running.stop()


@pytest.fixture()
def token(monkeypatch):
    monkeypatch.setenv("LOOKALIKE_MILVUS_TOKEN", TOKEN)


def photos_of(manifest: Path) -> list[Path]:
    return [Path(line.split(",")[1]) for line in manifest.read_text().splitlines()[1::3]]


def test_a_catalog_on_a_milvus_server_answers_as_the_local_store(server, token, tmp_path, branded_catalog):
    catalog, manifest = tmp_path / "cat", branded_catalog.parent / "manifest.csv"
    done = cli("index", str(manifest), "--catalog", str(catalog), "--store", server.spec, "-q")
    assert done.returncode == 0 and "18 new" in done.stdout, done.stderr
    info = json.loads(cli("info", "--catalog", str(catalog), "--json").stdout)
    assert info["store"] == server.spec and info["index"] == "milvus-ivf_flat" and info["images"] == 18
    photos = photos_of(manifest)
    assert top10(catalog, photos) == top10(branded_catalog, photos)
    assert top10(catalog, photos, {"brand": "nike"}) == top10(branded_catalog, photos, {"brand": "nike"})
    assert top10(catalog, photos, {"price": "0..20"}) == top10(branded_catalog, photos, {"price": "0..20"})
    first = photos[0].parent.name
    assert cli("remove", first, "--catalog", str(catalog)).returncode == 0
    again = json.loads(cli("search", str(photos[0]), "--catalog", str(catalog), "--json").stdout)  # a new process
    assert first not in {r["product_id"] for r in again["results"]} and len(again["results"]) == 5

    from pymilvus import MilvusClient

    client = MilvusClient(uri=server.spec.replace("milvus://", "http://"), token=TOKEN)
    collection = json.loads(next(catalog.glob("milvus-*.json")).read_text())["collection"]
    index = client.describe_index(collection, client.list_indexes(collection)[0])
    assert index["index_type"] == "IVF_FLAT" and index["metric_type"] == "IP" and int(index["nlist"]) == 1024
    client.close()


def test_store_migrate_to_a_milvus_server_and_back(server, token, tmp_path, branded_catalog):
    catalog = tmp_path / "cat"
    shutil.copytree(branded_catalog, catalog)
    photos = photos_of(branded_catalog.parent / "manifest.csv")
    before = top10(catalog, photos)
    done = cli("store", "migrate", "--catalog", str(catalog), "--to", server.spec)
    assert f"moved 18 vector(s) from local to {server.spec}" in done.stdout, done.stderr
    assert top10(catalog, photos) == before
    collection = json.loads(next(catalog.glob("milvus-*.json")).read_text())["collection"]
    assert cli("store", "migrate", "--catalog", str(catalog), "--to", "local").returncode == 0
    assert top10(catalog, photos) == before and not list(catalog.glob("milvus-*.json"))

    from pymilvus import MilvusClient

    client = MilvusClient(uri=server.spec.replace("milvus://", "http://"), token=TOKEN)
    assert collection not in client.list_collections()  # what the server held for the catalog is gone
    client.close()


def test_the_token_is_passed_and_a_wrong_one_is_one_clear_error(server, tmp_path, branded_catalog, monkeypatch):
    import os

    catalog = tmp_path / "cat"
    shutil.copytree(branded_catalog, catalog)
    photo = photos_of(branded_catalog.parent / "manifest.csv")[0]
    for token in ("", "root:wrong"):
        env = {k: v for k, v in os.environ.items() if k != "LOOKALIKE_MILVUS_TOKEN"}
        env.update({"LOOKALIKE_MILVUS_TOKEN": token} if token else {})
        done = cli("store", "migrate", "--catalog", str(catalog), "--to", server.spec, env=env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and f"store {server.spec}" in lines[0], done.stderr
        assert "Traceback" not in done.stderr
    with Catalog.open(catalog) as cat:  # refused before anything was written: still the local store
        assert cat.info()["store"] == "local" and cat.search(photo, k=1).results[0].product_id == photo.parent.name


def test_a_server_that_goes_away_is_one_clear_error_and_loses_nothing(server, token, tmp_path, branded_catalog):
    """Stopped mid-way (two embedded servers cannot run side by side: the second never answers), then
    started again on the same data and port."""
    catalog, manifest = tmp_path / "cat", branded_catalog.parent / "manifest.csv"
    lines = manifest.read_text().splitlines()
    half = tmp_path / "half.csv"
    half.write_text("\n".join(lines[:10]) + "\n")  # the header and 9 images: 3 products
    assert cli("index", str(half), "--catalog", str(catalog), "--store", server.spec, "-q").returncode == 0
    server.stop()
    try:
        done = cli("index", str(manifest), "--catalog", str(catalog), "-q")
    finally:
        server.start()  # the same data and port: the catalog catches up from its records
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(errors) == 1 and f"store {server.spec}" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    rows = sqlite3.connect(catalog / "catalog.db").execute("SELECT COUNT(*) FROM images").fetchone()[0]
    assert rows >= 9  # what was indexed before is still recorded (and what this run committed)
    again = cli("index", str(manifest), "--catalog", str(catalog), "-q")
    assert again.returncode == 0 and "catalog: 6 products, 18 images" in again.stdout, again.stderr
    photos = photos_of(manifest)
    assert top10(catalog, photos) == top10(branded_catalog, photos)
