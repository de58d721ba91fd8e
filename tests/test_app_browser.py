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


# -- pointing at the shoe, several shoes, more like this, no close match (issue 15) ----------------
@pytest.fixture(scope="module")
def app_page(chromium, sneaker_catalog, tmp_path_factory):
    """The real app on the test catalog and a Chromium; each test opens its own page (session)."""
    from playwright.sync_api import sync_playwright

    proc, url = start_app(sneaker_catalog, tmp_path_factory.mktemp("app") / "app.log")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)

            def open_page():
                page = browser.new_page(viewport={"width": 1400, "height": 1300})
                page.goto(url, wait_until="domcontentloaded")
                return page

            yield open_page
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def two_shoes(sneaker_catalog):
    """A shopper photo with exactly two detected shoes side by side (neither box inside the other),
    and what the Python API answers for each box, for the automatic choice and for a drawn box."""
    from lookalike import Catalog
    from lookalike.pipeline import BoxChoice

    _, probe = sneakers_split()
    with Catalog.open(sneaker_catalog) as cat:
        for r in probe:
            path = dataset_path("sneakers50", r)
            q = cat.detect(path)
            if len(q.boxes) != 2 or not (q.boxes[0].x2 < q.boxes[1].x1 or q.boxes[1].x2 < q.boxes[0].x1):
                continue
            auto = ids_of(cat.search(q, k=12))
            per_box = [ids_of(cat.search(q, k=12, box=BoxChoice.detected(n))) for n in range(2)]
            rows = [ids_of(cat.search(q, k=8, box=BoxChoice.detected(n))) for n in range(2)]
            if per_box[1] != auto:  # clicking box 2 must visibly change the answer
                return {"path": path, "query": q, "auto": auto, "per_box": per_box, "rows": rows}
    pytest.fail("no shopper photo with two separate shoes in the test catalog's probes")


def ids_of(result) -> list[str]:
    return [m.product_id for m in result.results]


def card_ids(page) -> list[str]:
    """The result cards' products in rank order (a grid's columns come one after another in the page),
    row by row when there are several."""
    cards = page.locator(".lookalike-card").evaluate_all(
        "cards => cards.map(c => [c.dataset.row, Number(c.dataset.rank), c.dataset.product])"
    )
    return [product for _, _, product in sorted(cards)]


def wait_for_cards(page, expected: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if card_ids(page) == expected:
            return
        time.sleep(0.25)
    assert card_ids(page) == expected


def upload(page, photo: Path) -> None:
    page.locator('input[type="file"]').first.set_input_files(str(photo), timeout=60_000)


def photo_box(page) -> dict:
    """Where the photo component's image is on the page (it is inside the component's iframe)."""
    image = page.frame_locator('iframe[title*="image_coordinates"]').locator("#image")
    image.wait_for(timeout=60_000)
    deadline = time.monotonic() + 30
    while (box := image.bounding_box()) is None or box["width"] < 50:
        assert time.monotonic() < deadline, "the photo never got its size"
        time.sleep(0.2)
    return box


def checked_radio(page) -> str:
    return page.locator('label:has(input[type="radio"]:checked)').first.inner_text()


def test_click_a_detected_box_searches_with_it(app_page, two_shoes):
    page = app_page()
    upload(page, two_shoes["path"])
    wait_for_cards(page, two_shoes["auto"])
    area, q = photo_box(page), two_shoes["query"]
    scale = area["width"] / q.image.width
    b = q.boxes[1]
    page.mouse.click(area["x"] + (b.x1 + b.x2) / 2 * scale, area["y"] + (b.y1 + b.y2) / 2 * scale)
    wait_for_cards(page, two_shoes["per_box"][1])
    assert checked_radio(page).startswith("Box 2")
    # a click outside every box changes nothing and says how to draw one
    page.mouse.click(area["x"] + 1, area["y"] + area["height"] - 2)
    page.get_by_text("That point is in no detected box").wait_for(timeout=30_000)
    assert card_ids(page) == two_shoes["per_box"][1]
    page.close()


def test_drag_draws_a_box_and_searches_with_it(app_page, two_shoes, sneaker_catalog):
    from lookalike import Catalog
    from lookalike.pipeline import BoxChoice

    page = app_page()
    upload(page, two_shoes["path"])
    wait_for_cards(page, two_shoes["auto"])
    area, q = photo_box(page), two_shoes["query"]
    scale = area["width"] / q.image.width
    w, h = q.image.size
    start, end = (0.1 * w, 0.15 * h), (0.6 * w, 0.9 * h)  # across the left part of the photo
    page.mouse.move(area["x"] + start[0] * scale, area["y"] + start[1] * scale)
    page.mouse.down()
    page.mouse.move(area["x"] + end[0] * scale, area["y"] + end[1] * scale, steps=8)
    page.mouse.up()
    page.locator('input[aria-label="left"]').wait_for(timeout=30_000)
    assert checked_radio(page).startswith("My own box")
    sides = ("left", "top", "right", "bottom")
    drawn = [int(page.locator(f'input[aria-label="{side}"]').input_value()) for side in sides]
    want = [start[0], start[1], end[0], end[1]]
    assert all(abs(d - v) <= 0.03 * max(w, h) + 1 for d, v in zip(drawn, want, strict=True)), (drawn, want)
    with Catalog.open(sneaker_catalog) as cat:
        expected = ids_of(cat.search(two_shoes["path"], k=12, box=BoxChoice.manual(*drawn)))
    wait_for_cards(page, expected)
    page.close()


def test_every_shoe_gets_a_row(app_page, two_shoes):
    page = app_page()
    upload(page, two_shoes["path"])
    wait_for_cards(page, two_shoes["auto"])
    page.get_by_text("Search every shoe").click()
    page.get_by_text("Shoe 2").first.wait_for(timeout=60_000)
    wait_for_cards(page, two_shoes["rows"][0] + two_shoes["rows"][1])
    page.close()


def test_more_like_this_and_back(app_page, two_shoes, sneaker_catalog):
    from lookalike import Catalog

    page = app_page()
    upload(page, two_shoes["path"])
    wait_for_cards(page, two_shoes["auto"])
    first = two_shoes["auto"][0]
    with Catalog.open(sneaker_catalog) as cat:
        expected = ids_of(cat.similar(first, k=12))
    page.get_by_role("button", name="More like this").first.click()
    page.get_by_text(f"More like {first}").first.wait_for(timeout=60_000)
    wait_for_cards(page, expected)
    assert first not in expected  # the product itself is left out
    page.get_by_role("button", name="Back").click()
    wait_for_cards(page, two_shoes["auto"])
    page.close()


def test_photo_without_a_shoe_says_no_close_match(app_page, tmp_path):
    from PIL import Image

    wall = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), (128, 128, 120)).save(wall)
    page = app_page()
    upload(page, wall)
    page.get_by_text("No close match").first.wait_for(timeout=60_000)
    assert card_ids(page) == [] and page.get_by_text("Traceback").count() == 0
    page.close()
