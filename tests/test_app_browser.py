"""End to end in a real browser: Debian's Chromium driven by Playwright against `lookalike app`
started on a free loopback port, with a real catalog and the real models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import dataset_path, free_port, sneakers_split, wait_until_up

CHROMIUM = os.environ.get("LOOKALIKE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


def start_app(catalog: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lookalike.cli", "app", "--catalog", str(catalog), "--port", str(port)],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, url + "/_stcore/health", log, ready=lambda body: body.strip() == b"ok")
    return proc, url


def screenshot_search(catalog: Path, photo: Path, out: Path, log: Path, bad_upload: Path | None = None) -> list[str]:
    """Open the app, upload `photo`, wait for result cards, save a screenshot; returns ranked product ids."""
    from playwright.sync_api import sync_playwright

    proc, url = start_app(catalog, log)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(url, wait_until="domcontentloaded")
            page.locator('input[type="file"]').first.set_input_files(str(photo), timeout=60_000)
            page.locator(".lookalike-card").first.wait_for(timeout=90_000)
            page.wait_for_load_state("networkidle")
            page.locator("img").last.wait_for(timeout=30_000)
            time.sleep(1.0)  # let the result thumbnails paint
            page.screenshot(path=str(out), full_page=True)
            ids = page.locator(".lookalike-card").evaluate_all(
                "cards => cards.sort((a, b) => a.dataset.rank - b.dataset.rank).map(c => c.dataset.product)"
            )
            if bad_upload is not None:  # then a file that is not an image: one message, no trace
                page.locator('input[type="file"]').first.set_input_files(str(bad_upload))
                page.get_by_text("not an image").first.wait_for(timeout=30_000)
                assert page.get_by_text("Traceback").count() == 0
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return ids


@pytest.fixture(scope="module")
def chromium():
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: bin/test installs it with apt-get")
        pytest.skip(f"{CHROMIUM} is missing (bin/test installs it)")
    return CHROMIUM


def test_upload_shows_results_in_a_browser(chromium, sneaker_catalog, tmp_path):
    _, probe = sneakers_split()
    # a shopper photo whose product the pipeline ranks first (checked through the Python API)
    from lookalike import Catalog

    with Catalog.open(sneaker_catalog) as cat:
        row = next(
            r for r in probe if cat.search(dataset_path("sneakers50", r), k=1).results[0].product_id == r["product"]
        )
    shot = tmp_path / "app.png"
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    ids = screenshot_search(sneaker_catalog, dataset_path("sneakers50", row), shot, tmp_path / "app.log", bad)
    assert len(ids) == 12  # the default k
    assert ids[0] == row["product"]
    assert shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")
