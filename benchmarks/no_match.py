"""The "no close match" threshold: how a rule learned on the catalog alone separates shopper photos
of catalog products from photos with no shoe in them.

    bin/python benchmarks/no_match.py [--json OUT]

Catalog: sneakers50's catalog shots (scene=catalog, 50 products). The rule: the threshold is a
quantile of the scores between random pairs of *different* catalog products (what "as close as two
unrelated products of this shop" means for this catalog and model); a query whose best product
scores below it gets "no close match". The quantile level is chosen on products 1-25 (sneakers50
half 1: its shopper photos against the whole catalog) and reported on products 26-50 and on suite 1
(all shopper photos), and again for catalogs of 5, 10, 20 and 50 products (`small_catalogs`).
No-shoe photos: generated plain, gradient and noise images, and crops of the upper fifth of
`clothing_small_shoes` phone photos (floor, carpet, wall: no shoe in most of them).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import machine  # noqa: E402
from suites import DATASETS, emit  # noqa: E402

from lookalike.calibration import no_match_score  # noqa: E402
from lookalike.pipeline import Photos, PipelineConfig, default_cache  # noqa: E402

LEVELS = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99)


def probes(folder: Path) -> list[Path]:
    """Photos with no shoe: made here, and the upper fifth of real floor photos."""
    rng = np.random.default_rng(3)
    paths = []
    for n in range(60):
        kind = n % 3
        if kind == 0:
            a = np.full((240, 240, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        elif kind == 1:
            t = np.linspace(0, 1, 240)[:, None, None]
            a = (t * rng.integers(0, 256, 3) + (1 - t) * rng.integers(0, 256, 3)).astype(np.uint8).repeat(240, 1)
        else:
            a = rng.integers(0, 256, (240, 240, 3), dtype=np.uint8)
        paths.append(folder / f"made-{n}.png")
        Image.fromarray(a).save(paths[-1])
    for photo in sorted((DATASETS / "clothing_small_shoes").rglob("*.jpg"))[:60]:
        with Image.open(photo) as img:
            top = img.convert("RGB").crop((0, 0, img.width, img.height // 5))
        paths.append(folder / f"floor-{photo.stem}.png")
        top.save(paths[-1])
    return paths


SIZES = (5, 10, 20, 50)
DRAWS = 30  # random subsets of products per size (one at 50: all of them)


def small_catalogs(vectors: np.ndarray, rows: list[dict], ok: np.ndarray, no_shoe: np.ndarray,
                   products: list[str]) -> dict:  # fmt: skip
    """Catalogs of 5, 10, 20 and 50 products (random subsets: of products 1-25, where the small-catalog
    rule was chosen, of 26-50, and of all 50): the share of right top-1 answers to their shopper photos
    that the threshold keeps, and the share of no-shoe photos it refuses, with the level lowered for
    small catalogs (`calibration.level_for`, the default) and with the median at every size."""
    product = np.array([r["product"] for r in rows])
    scene = np.array([r["scene"] for r in rows])
    out = {}
    for pool_name, pool in (("products 1-25", products[:25]), ("products 26-50", products[25:]), ("all", products)):
        for size in SIZES:
            if size > len(pool):
                continue
            rng = np.random.default_rng(11)
            tally = {rule: np.zeros(4) for rule in ("by size", "median")}
            for _ in range(DRAWS if size < len(pool) else 1):
                chosen = list(rng.choice(pool, size, replace=False)) if size < len(pool) else list(pool)
                g = np.where(ok & (scene == "catalog") & np.isin(product, chosen))[0]
                q = np.where(ok & (scene == "wild") & np.isin(product, chosen))[0]
                sim = vectors[q] @ vectors[g].T
                best, right = sim.max(axis=1), product[g][sim.argmax(axis=1)] == product[q]
                refused_by = (no_shoe @ vectors[g].T).max(axis=1)
                for rule, by_size in (("by size", True), ("median", False)):
                    t = no_match_score(vectors[g], list(product[g]), by_size=by_size)
                    tally[rule] += [(right & (best >= t)).sum(), right.sum(), (refused_by < t).sum(), len(refused_by)]
            out[f"{pool_name}, {size} products"] = {
                rule: {"kept_correct": round(float(a / b), 4), "no_shoe_refused": round(float(c / d), 4)}
                for rule, (a, b, c, d) in tally.items()
            }
            print(pool_name, size, out[f"{pool_name}, {size} products"], file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = list(csv.DictReader(open(DATASETS / "sneakers50" / "labels.csv", newline="")))
    photos = Photos(PipelineConfig(), 2, default_cache())
    vectors, _ = photos.vectors([str(DATASETS / "sneakers50" / r["file"]) for r in rows])
    ok = ~np.isnan(vectors).any(axis=1)
    products = sorted({r["product"] for r in rows})
    half1 = set(products[:25])
    gallery = [i for i, r in enumerate(rows) if ok[i] and r["scene"] == "catalog"]
    queries = [i for i, r in enumerate(rows) if ok[i] and r["scene"] == "wild"]
    gv, glabels = vectors[gallery], [rows[i]["product"] for i in gallery]
    score = {level: no_match_score(gv, glabels, level) for level in LEVELS}  # learned on the catalog only (50 products)

    def top1(qv: np.ndarray) -> tuple[np.ndarray, list[str]]:
        sim = qv @ gv.T
        best = sim.argmax(axis=1)
        return sim[np.arange(len(qv)), best], [glabels[b] for b in best]

    qs, qp = top1(vectors[queries])
    right = np.array([qp[n] == rows[i]["product"] for n, i in enumerate(queries)])
    in_half1 = np.array([rows[i]["product"] in half1 for i in queries])
    with tempfile.TemporaryDirectory() as tmp:
        pv, _ = photos.vectors([str(p) for p in probes(Path(tmp))])
    ps, _ = top1(pv[~np.isnan(pv).any(axis=1)])
    out = {"machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "levels": {}}  # fmt: skip
    for level, threshold in score.items():
        kept = qs >= threshold

        def share(mask: np.ndarray, kept: np.ndarray = kept) -> float:
            return round(float((kept & right & mask).sum() / max((right & mask).sum(), 1)), 4)

        out["levels"][level] = {"threshold": round(threshold, 4), "kept_correct_half1": share(in_half1),
                                "kept_correct_half2": share(~in_half1), "kept_correct_suite1": share(in_half1 | True),
                                "no_shoe_refused": round(float((ps < threshold).mean()), 4)}  # fmt: skip
        print(level, out["levels"][level], file=sys.stderr, flush=True)
    out["sizes"] = small_catalogs(vectors, rows, ok, pv[~np.isnan(pv).any(axis=1)], products)
    out["correct_top1_suite1"] = round(float(right.mean()), 4)
    out["no_shoe_probes"] = int(len(ps))
    out["score_quantiles"] = {"correct shopper top-1": np.percentile(qs[right], [5, 50, 95]).round(3).tolist(),
                              "no-shoe top-1": np.percentile(ps, [5, 50, 95]).round(3).tolist()}  # fmt: skip
    emit(out, args.json)


if __name__ == "__main__":
    main()
