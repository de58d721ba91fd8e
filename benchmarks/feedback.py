"""Suite F: learning from shoppers' feedback (issue 25).

    python benchmarks/feedback.py [--variants base,clean,wrong10,wrong25] [--amounts 0.1,0.25,0.5]
                                  [--open-set] [--json OUT]

sneakers50's shopper photos (scene=wild) of each product are split in two halves by a fixed rule that
keeps near-identical photos (scoring at least `info --duplicates`' threshold, untuned) on the same side:
half A are past searches, half B the test. A simulated shopper searches each half-A photo with the
catalog-tuned model (tuned on the 2,848 catalog shots, as `lookalike tune` does; products ranked by their
best image, as search ranks them) and clicks the right product when it is among the 10 shown, with a
probability falling with its rank (0.9 at rank 1 to 0.5 at rank 10); in a share of searches (10%, 25%)
the shopper clicks a wrong product that was shown instead. Tuning then learns from the catalog shots and
the clicked photos (labelled with the product clicked), and half B is searched against the catalog
shots. Queries never include a feedback photo (`eval --feedback`).

Variants: `base` (tuned without feedback), `clean` (clicks without mistakes), `wrong10`, `wrong25`;
`--amounts` repeats `wrong10` with that share of half A's searches; `--open-set` gives feedback only for
products 1-25 (sorted ids) and searches half B of products 26-50, against the base model on the same
queries. Each tuning is cached by eval's cache (same photos, labels, options: no second run).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from suites import DATASETS, OUT

from lookalike.config import PipelineConfig
from lookalike.eval import evaluate, read_labels, tune_on_rows
from lookalike.groups import near_groups
from lookalike.offline import Photos, rank_products
from lookalike.pipeline import DUPLICATE_SCORE

S50 = DATASETS / "sneakers50"
CLICK_AT_1, CLICK_AT_10 = 0.9, 0.5


def split_halves() -> list[dict]:
    """sneakers50's rows with `half` A or B for shopper photos ('' for catalog shots): per product, groups
    of near-identical photos (connected by an untuned score >= DUPLICATE_SCORE) go to one side, groups
    taken in the order of their first photo's hash, each to the side with fewer photos so far."""
    rows = read_labels(S50 / "labels.csv", S50, "product")
    wild = [i for i, r in enumerate(rows) if r["scene"] == "wild"]
    vectors, _ = Photos(PipelineConfig(), 2).vectors([rows[i]["__path__"] for i in wild])
    by_product: dict[str, list[int]] = {}
    for n, i in enumerate(wild):
        by_product.setdefault(rows[i]["product"], []).append(n)
    for _, members in sorted(by_product.items()):
        v = np.nan_to_num(vectors[members])
        groups = [[members[m] for m in g] for g in near_groups(v, DUPLICATE_SCORE)]
        order = sorted(groups, key=lambda g: hashlib.sha256(rows[wild[g[0]]]["file"].encode()).hexdigest())
        sizes = {"A": 0, "B": 0}
        for g in order:
            side = "A" if sizes["A"] <= sizes["B"] else "B"
            sizes[side] += len(g)
            for n in g:
                rows[wild[n]]["half"] = side
    for r in rows:
        r.setdefault("half", "")
    return rows


def ranked_products(model: Path, rows: list[dict], queries: list[int], gallery: list[int]) -> list[list[str]]:
    """Each query's products, best first, as a catalog searched with `model` ranks them (best image)."""
    photos = Photos(PipelineConfig().with_options({"whiten": "0", "embedder": str(model)}), 2)
    q, _ = photos.vectors([rows[i]["__path__"] for i in queries])
    g, _ = photos.vectors([rows[i]["__path__"] for i in gallery])
    sim, labels = rank_products(np.nan_to_num(q) @ np.nan_to_num(g).T, [rows[i]["product"] for i in gallery], "best")
    return [[labels[j] for j in np.argsort(-row)[:10]] for row in sim]


def clicks(shown: list[list[str]], truth: list[str], wrong: float, share: float, seed: int = 0) -> list[str | None]:
    """The product each search's shopper clicked (None: no click): the right one with a probability
    falling with its rank, or in a `wrong` share of searches a wrong one that was shown; only a `share`
    of the searches happened at all."""
    rng = random.Random(seed)
    out: list[str | None] = []
    for products, right in zip(shown, truth, strict=True):
        if rng.random() >= share:
            out.append(None)
            continue
        others = [p for p in products if p != right]
        if rng.random() < wrong and others:
            out.append(rng.choice(others))
        elif right in products:
            rank = products.index(right)
            p = CLICK_AT_1 - (CLICK_AT_1 - CLICK_AT_10) * rank / 9
            out.append(right if rng.random() < p else None)
        else:
            out.append(None)
    return out


def write_labels(rows: list[dict], clicked: dict[int, str], path: Path) -> None:
    """A labels file: `label` is the product for catalog shots and queries, the clicked product for
    the feedback photos (`fb=1`), blank for half-A photos nobody clicked (not used)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "product", "scene", "half", "first25", "label", "fb"])
        for i, r in enumerate(rows):
            fb = i in clicked
            label = clicked[i] if fb else ("" if r["half"] == "A" else r["product"])
            w.writerow([r["file"], r["product"], r["scene"], r["half"], r["first25"], label, "1" if fb else ""])


def measure(labels: Path, query: str, feedback: str | None) -> dict:
    t0 = time.perf_counter()
    model, report = tune_on_rows(labels, S50, "label", "scene=catalog", {}, feedback=feedback)
    tuned_s = time.perf_counter() - t0
    options = {"whiten": "0", "embedder": str(model)}
    out = {"tune_s": round(tuned_s), "cached": bool(report.get("cached")),
           "feedback_photos": report.get("feedback_photos")}  # fmt: skip
    for level, rank in (("image", "image"), ("product", "best")):
        m = evaluate(labels, S50, "label", query, "scene=catalog", {**options, "rank": rank},
                     never_query=feedback).metrics  # fmt: skip
        out[level] = {k: round(m[k], 4) for k in ("recall@1", "recall@10", "mAP@10", "queries")}
    return out


def product_recall(
    queries: np.ndarray, gallery: np.ndarray, labels: list[str], truth: list[str]
) -> tuple[float, float]:
    """Product-level R@1 / R@10 (best image), as search ranks."""
    sim, names = rank_products(queries @ gallery.T, labels, "best")
    order = np.argsort(-sim, axis=1)
    r1 = np.mean([names[o[0]] == t for o, t in zip(order, truth, strict=True)])
    r10 = np.mean([t in [names[j] for j in o[:10]] for o, t in zip(order, truth, strict=True)])
    return round(float(r1), 4), round(float(r10), 4)


def reweighted(x: np.ndarray, w: float, tuned_dim: int = 512) -> np.ndarray:
    """A tuned vector [tuned, original] as if exported with original_weight w (each part unit length,
    weighed by square roots, so that a cosine is (1 - w) tuned + w original)."""
    t, o = x[:, :tuned_dim], x[:, tuned_dim:]
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    o = o / np.maximum(np.linalg.norm(o, axis=1, keepdims=True), 1e-12)
    return np.concatenate([np.sqrt(1 - w) * t, np.sqrt(w) * o], axis=1)


def checks(rows: list[dict], base: Path | None, tuned: Path) -> dict:
    """Two cheap checks on cached vectors: the untuned vector's weight in a tuned one (re-weighted from
    its two unit parts, exact: the export weighs them by the square roots), and half A's photos with
    their true labels as extra references at search time."""
    cat = [i for i, r in enumerate(rows) if r["scene"] == "catalog"]
    a = [i for i, r in enumerate(rows) if r["half"] == "A"]
    b = [i for i, r in enumerate(rows) if r["half"] == "B"]
    truth = [rows[i]["product"] for i in b]
    out: dict = {"original_weight": {}, "references": {}}

    def vectors(model: Path | None, idx: list[int]) -> np.ndarray:
        options = {"whiten": "0", **({"embedder": str(model)} if model else {})}
        v, _ = Photos(PipelineConfig().with_options(options), 2).vectors([rows[i]["__path__"] for i in idx])
        return np.nan_to_num(v)

    vc, vb = vectors(tuned, cat), vectors(tuned, b)
    for w in (0.0, 0.25, 0.5, 0.75):
        q, g = (reweighted(x, w) for x in (vb, vc))
        out["original_weight"][str(w)] = product_recall(q, g, [rows[i]["product"] for i in cat], truth)
    for name, model in (("untuned", None), ("catalog-tuned", base)):
        vc, va, vb = vectors(model, cat), vectors(model, a), vectors(model, b)
        labels = [rows[i]["product"] for i in cat]
        out["references"][name] = {
            "catalog": product_recall(vb, vc, labels, truth),
            "catalog + half A": product_recall(
                vb, np.vstack([vc, va]), labels + [rows[i]["product"] for i in a], truth
            ),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="base,wrong10,clean,wrong25")
    ap.add_argument("--amounts", default="", help="shares of half A searched, for the curve (with wrong10)")
    ap.add_argument("--open-set", action="store_true")
    ap.add_argument("--checks", action="store_true", help="the original_weight and references checks (cached)")
    ap.add_argument("--json", type=Path, default=OUT / "feedback.json")
    args = ap.parse_args()
    rows = split_halves()
    products = sorted({r["product"] for r in rows})
    for r in rows:
        r["first25"] = "1" if r["product"] in products[:25] else ""
    base_labels = OUT / "suite_f.csv"
    OUT.mkdir(parents=True, exist_ok=True)
    write_labels(rows, {}, base_labels)
    a = [i for i, r in enumerate(rows) if r["half"] == "A"]
    gallery = [i for i, r in enumerate(rows) if r["scene"] == "catalog"]
    results: dict = json.loads(args.json.read_text()) if args.json.exists() else {}
    results["halves"] = {"A": len(a), "B": sum(r["half"] == "B" for r in rows), "catalog": len(gallery)}

    def save(name: str, value: dict) -> None:
        results[name] = value
        args.json.write_text(json.dumps(results, indent=2))
        print(name, json.dumps(value), file=sys.stderr, flush=True)

    base_model, _ = tune_on_rows(base_labels, S50, "label", "scene=catalog", {})
    shown = ranked_products(base_model, rows, a, gallery)
    truth = [rows[i]["product"] for i in a]
    results["half_A_right_in_top10"] = round(np.mean([t in s for s, t in zip(shown, truth, strict=True)]), 4)
    plan = [(v, 1.0) for v in args.variants.split(",") if v] + [
        ("wrong10", float(x)) for x in args.amounts.split(",") if x
    ]
    for variant, share in plan:
        if variant == "base":
            save("base", measure(base_labels, "half=B", None))
            continue
        wrong = {"clean": 0.0, "wrong10": 0.1, "wrong25": 0.25}[variant]
        picked = clicks(shown, truth, wrong, share)
        clicked = {i: p for i, p in zip(a, picked, strict=True) if p is not None}
        name = variant if share == 1.0 else f"{variant}_share{share}"
        path = OUT / f"suite_f_{name}.csv"
        write_labels(rows, clicked, path)
        value = measure(path, "half=B", "fb=1")
        value["clicks"] = len(clicked)
        value["wrong_clicks"] = sum(rows[i]["product"] != p for i, p in clicked.items())
        save(name, value)
    if args.checks:  # on the wrong10 model (it is tuned here first if it is not cached)
        picked = clicks(shown, truth, 0.1, 1.0)
        path = OUT / "suite_f_wrong10.csv"
        write_labels(rows, {i: p for i, p in zip(a, picked, strict=True) if p is not None}, path)
        tuned, _ = tune_on_rows(path, S50, "label", "scene=catalog", {}, feedback="fb=1")
        save("checks", checks(rows, base_model, tuned))
    if args.open_set:  # feedback for products 1-25 only; products 26-50 searched
        picked = clicks(shown, truth, 0.1, 1.0)
        clicked = {i: p for i, p in zip(a, picked, strict=True) if p is not None and rows[i]["first25"]}
        path = OUT / "suite_f_open.csv"
        write_labels(rows, clicked, path)
        save("open_base", measure(base_labels, "half=B&first25=", None))
        save("open_wrong10", {**measure(path, "half=B&first25=", "fb=1"), "clicks": len(clicked)})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
