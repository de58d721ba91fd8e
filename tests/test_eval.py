"""`lookalike eval`: metrics against hand-computed values, and a tiny set whose answers are known."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import dataset_path, rows
from PIL import Image, ImageEnhance

from lookalike.embed import Whitening
from lookalike.errors import LookalikeError
from lookalike.eval import evaluate, parse_where, retrieval_metrics


def test_metrics_by_hand():
    sim = np.array(
        [
            [0.9, 0.8, 0.1, 0.5],  # label a: ranks a(hit) b c a(hit) -> R@1 1, AP = (1/1 + 2/4) / 2
            [0.9, 0.2, 0.3, 0.1],  # label b: ranks a a b(hit) c       -> R@1 0, R@5 1, AP = (1/3) / 1
            [0.1, 0.2, 0.3, 0.4],  # label z: nothing relevant         -> left out
        ]
    )
    m = retrieval_metrics(sim, ["a", "b", "z"], ["a", "b", "a", "c"])
    assert m["queries"] == 2 and m["queries_without_relevant"] == 1
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["recall@5"] == pytest.approx(1.0) and m["recall@10"] == pytest.approx(1.0)
    assert m["mAP@10"] == pytest.approx((0.75 + 1 / 3) / 2)


def test_excluded_pairs_are_not_results_nor_relevant():
    # leave-one-out: the query is gallery item 0, excluded with -inf
    sim = np.array([[-np.inf, 0.2, 0.9]])
    m = retrieval_metrics(sim, ["a"], ["a", "a", "b"])
    assert m["recall@1"] == 0.0 and m["recall@5"] == 1.0
    assert m["mAP@10"] == pytest.approx(0.5)  # one relevant item (not the query itself), found at rank 2
    none_left = retrieval_metrics(np.array([[-np.inf, 0.3]]), ["a"], ["a", "b"])
    assert none_left["queries"] == 0


def test_where_and_whitening():
    keep = parse_where("scene=wild & product!=")
    assert keep({"scene": "wild", "product": "x"}) and not keep({"scene": "wild", "product": ""})
    assert not keep({"scene": "catalog", "product": "x"})
    with pytest.raises(LookalikeError):
        parse_where("scene")
    g = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    w = Whitening.fit(g, 4)(g)
    assert w.shape == (50, 4)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def near_duplicates(tmp_path_factory):
    """Eight real shoe photos of different models, each with an edited copy (resized, brighter,
    recompressed): label = the source photo."""
    root = tmp_path_factory.mktemp("dups")
    lines = ["file,label,kind"]
    firsts = {}
    for r in rows("sneakers50"):
        if r["scene"] == "catalog":
            firsts.setdefault(r["product"], r)
    for n, r in enumerate(list(firsts.values())[::6][:8]):
        img = Image.open(dataset_path("sneakers50", r)).convert("RGB")
        img.thumbnail((400, 400))
        img.save(root / f"{n}_a.jpg")
        edited = ImageEnhance.Brightness(img.resize((img.width * 9 // 10, img.height * 9 // 10))).enhance(1.08)
        buf = io.BytesIO()
        edited.save(buf, format="JPEG", quality=80)
        (root / f"{n}_b.jpg").write_bytes(buf.getvalue())
        lines += [f"{n}_a.jpg,shoe{n},original", f"{n}_b.jpg,shoe{n},edited"]
    (root / "broken.jpg").write_bytes(b"not an image")
    lines.append("broken.jpg,shoe0,original")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_near_duplicates_find_each_other(near_duplicates, tmp_path):
    labels = near_duplicates / "labels.csv"
    cache = tmp_path / "cache.db"
    loo = evaluate(labels, near_duplicates, "label", cache_path=cache)
    assert loo.metrics["queries"] == 16 and loo.metrics["recall@1"] == 1.0 and loo.metrics["mAP@10"] == 1.0
    assert [p.rsplit("/", 1)[1] for p, _ in loo.failed] == ["broken.jpg"]
    split = evaluate(labels, near_duplicates, "label", "kind=edited", "kind=original", cache_path=cache)
    assert split.metrics["queries"] == 8 and split.metrics["gallery"] == 8 and split.metrics["recall@1"] == 1.0
    # configurations are options, and the cache makes a second run of the same one cheap
    whole = evaluate(labels, near_duplicates, "label", options={"crop.strategy": "whole", "flip": "true"},
                     cache_path=cache)  # fmt: skip
    assert whole.config["crop"]["strategy"] == "whole" and whole.config["flip"] is True
    with pytest.raises(LookalikeError, match="unknown configuration option"):
        evaluate(labels, near_duplicates, "label", options={"colour": "red"}, cache_path=cache)


def test_eval_command(near_duplicates, tmp_path):
    out = tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", "eval", str(near_duplicates / "labels.csv"), "--label", "label",
         "--query", "kind=edited", "--gallery", "kind=original", "--config", "flip=true", "--json", str(out),
         "--cache", str(tmp_path / "c.db"), "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| queries | gallery | recall@1" in proc.stdout
    metrics = json.loads(out.read_text())
    assert metrics["recall@1"] == 1.0 and metrics["config"]["flip"] is True
    bad = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", "eval", str(near_duplicates / "labels.csv"), "--label", "nope"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "no column 'nope'" in bad.stderr


def test_the_eval_cache_keeps_the_newest_vectors(tmp_path):
    import numpy as np

    from lookalike.offline import VectorCache

    cache = VectorCache(tmp_path / "eval.db")
    for i in range(10):
        cache.put_vector(f"sha{i}", "cfg", np.full(4, i, np.float32))
    assert cache.prune(keep=4) == 6 and cache.prune(keep=4) == 0
    assert cache.vector("sha5", "cfg") is None and cache.vector("sha6", "cfg")[0] == 6
    cache.close()
