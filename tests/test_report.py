"""`lookalike eval --report`: each query's outcome (rank of the right one, results, the right
product's best image), the Recall@k curve and per-label breakdown, and the HTML page opened in a real
Chromium with its plot and failure gallery."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import DATASETS, sneakers_split
from test_app_browser import CHROMIUM_ARGS, chromium  # noqa: F401  (the fixture)

from lookalike.eval import EvalResult, outcomes, retrieval_metrics


def test_outcomes_by_hand():
    sim = np.array(
        [
            [0.9, 0.8, 0.1, 0.5],  # label a: right at rank 1
            [0.9, 0.2, 0.3, 0.1],  # label b: two a images ahead -> rank 3
            [0.1, 0.2, 0.3, 0.4],  # label z: nothing relevant
            [0.2, 0.1, 0.6, 0.7],  # label b: three images ahead -> rank 4
        ]
    )
    labels = ["a", "b", "a", "c"]
    images = ["g0", "g1", "g2", "g3"]
    found = outcomes(["q0", "q1", "q2", "q3"], ["a", "b", "z", "b"], sim, labels, sim, labels, images)
    assert [o.image for o in found] == ["q3", "q1", "q0", "q2"]  # worst first, the unanswerable last
    assert [o.rank for o in found] == [4, 3, 1, None]
    assert found[1].results[:3] == [("a", "g0", 0.9), ("a", "g2", 0.3), ("b", "g1", 0.2)]
    assert found[1].right == ("g1", 0.2)
    result = EvalResult(retrieval_metrics(sim, ["a", "b", "z", "b"], labels), {}, outcomes=found)
    curve = result.recall_curve(4)
    assert curve == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1.0])
    assert curve[0] == pytest.approx(result.metrics["recall@1"])
    assert [d["label"] for d in result.by_label()] == ["b", "a"]  # b: R@1 0 (hardest), a: 1

    # products ranked (rank=best): a product's result shows its best image
    product_sim = np.array([[0.9, 0.2, 0.5]])
    found = outcomes(["q"], ["b"], product_sim, ["a", "b", "c"], sim[1:2], labels, images)
    assert found[0].rank == 3 and found[0].results[0] == ("a", "g0", 0.9) and found[0].right == ("g1", 0.2)


@pytest.fixture(scope="module")
def shopper_labels(tmp_path_factory):
    """Ten sneakers50 products: catalog shots as the gallery, shopper photos as queries."""
    gallery, probe = sneakers_split(n_products=10, per_product=6, queries=4)
    path = tmp_path_factory.mktemp("report") / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "product", "scene"])
        w.writeheader()
        for r in gallery + probe:
            w.writerow({k: r[k] for k in ("file", "product", "scene")})
    return path


def test_report_opens_in_chromium_with_plot_and_failures(chromium, shopper_labels, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    out = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", "eval", str(shopper_labels), "--root", str(DATASETS / "sneakers50"),
         "--label", "product", "--query", "scene=wild", "--gallery", "scene=catalog", "--report", str(out), "-q",
         "--cache", str(tmp_path / "eval.db")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"report: {out}" in done.stdout
    r1 = float(re.search(r"\| (\d+) \| (\d+) \| ([0-9.]+) \|", done.stdout).group(3))
    assert 0 < r1 < 1  # shopper photos: some right, some wrong, so the gallery has rows
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(out.as_uri())
        assert page.locator("#recall-plot svg").count() == 1
        assert page.locator("#recall-plot svg path").count() > 5  # the curve, axes and grid are drawn
        assert page.locator("#metrics").inner_text().count(f"{r1:.3f}") >= 1
        failures = page.locator("#failures .failure")
        assert failures.count() >= 1
        loaded = failures.locator("img").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
        assert loaded and all(loaded)  # every picture is in the file itself and decodes
        assert failures.first.locator("figure.query").count() == 1
        assert failures.first.locator("figure.right").count() == 1
        assert failures.first.locator("figure.wrong").count() >= 1
        assert page.locator("#labels tr").count() == 1 + 10  # a row per product
        browser.close()


def test_report_path_refused_before_any_work(shopper_labels, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", "eval", str(shopper_labels), "--label", "product", "--report",
         str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"--report {tmp_path}: not a file that can be written" in done.stderr
