"""Shared fixtures: the real datasets (never copied into the repo) and a small real catalog."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lookalike import Catalog

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", ROOT.parent / "shared" / "datasets")).resolve()


def rows(dataset: str) -> list[dict]:
    with open(DATASETS / dataset / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def sneakers_split(n_products: int = 30, per_product: int = 10, queries: int = 5, seed: int = 7):
    """A fixed sample of sneakers50: catalog shots to index, shopper ('wild') photos to search with."""
    by_product: dict[str, dict[str, list[dict]]] = {}
    for r in rows("sneakers50"):
        by_product.setdefault(r["product"], {"catalog": [], "wild": []})[r["scene"]].append(r)
    rng = random.Random(seed)
    products = sorted(by_product)
    rng.shuffle(products)
    gallery, probe = [], []
    for p in products[:n_products]:
        gallery += rng.sample(by_product[p]["catalog"], min(per_product, len(by_product[p]["catalog"])))
        probe += rng.sample(by_product[p]["wild"], min(queries, len(by_product[p]["wild"])))
    return gallery, probe


def dataset_path(dataset: str, row: dict) -> Path:
    return DATASETS / dataset / row["file"]


@pytest.fixture(scope="session", autouse=True)
def _datasets_present():
    if not (DATASETS / "sneakers50" / "labels.csv").exists():
        message = f"datasets not found at {DATASETS} (set LOOKALIKE_DATASETS)"
        if os.environ.get("CI"):
            pytest.exit(message, returncode=3)
        pytest.skip(message)


@pytest.fixture(scope="session")
def sneaker_folder(tmp_path_factory) -> Path:
    """The 300-image gallery laid out as a folder source: one sub-folder per product."""
    gallery, _ = sneakers_split()
    root = tmp_path_factory.mktemp("sneakers_folder")
    for r in gallery:
        dst = root / r["product"] / Path(r["file"]).name
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(dataset_path("sneakers50", r), dst)
    return root


@pytest.fixture(scope="session")
def sneaker_catalog(tmp_path_factory, sneaker_folder) -> Path:
    """A real catalog (real models, real SQLite + FAISS) of the 300 gallery images, built once."""
    directory = tmp_path_factory.mktemp("sneaker_catalog")
    with Catalog.open(directory, create=True) as cat:
        report = cat.index(sneaker_folder)
    assert report.added == 300 and not report.failed
    return directory


@pytest.fixture(scope="session")
def branded_catalog(tmp_path_factory, sneaker_folder) -> Path:
    """A small real catalog from a CSV manifest with metadata: 6 products x 3 images, two brands."""
    root = tmp_path_factory.mktemp("branded")
    lines = ["product_id,image,brand,price,url"]
    for i, product in enumerate(sorted(sneaker_folder.iterdir())[:6]):
        for img in sorted(product.glob("*.jpg"))[:3]:
            lines.append(f"{product.name},{img},{'Nike' if i % 2 else 'Vans'},{10 * i},https://shop.example/{i}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    with Catalog.open(root / "cat", create=True) as cat:
        assert cat.index(root / "manifest.csv").added == 18
    return root / "cat"


API_TOKEN = "server-token-456"


def start_api_server(catalog: Path, log: Path, *extra: str, token: str = API_TOKEN) -> tuple[subprocess.Popen, str]:
    """`lookalike serve` in another process on a loopback port, as users run it; returns (process, base URL)."""
    port = free_port()
    env = {**os.environ, "LOOKALIKE_API_TOKEN": token}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lookalike.cli", "serve", "--catalog", str(catalog), "--port", str(port), *extra],
        env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, url + "/health", log, ready=lambda body: json.loads(body).get("models_loaded"))
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, ready=lambda body: True, timeout: float = 90) -> None:
    """Poll `url` until it answers 200 and `ready(body)`; fail with the server's log if it dies or hangs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited early:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and ready(r.read()):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not come up:\n{log.read_text()}")
