"""Tuning on sneakers50, measured honestly: what is learned comes only from catalog rows.

    python benchmarks/tune.py [--suite 1|5] [--option KEY=VALUE ...] [--json OUT]

Suite 1 (closed set): tune on the catalog shots (scene=catalog) of all 50 products, evaluate shopper
photos (scene=wild) against those catalog shots. Suite 5 (open set): tune on the catalog shots of the
first 25 products (sorted by id), evaluate shopper -> catalog on the other 25, which tuning never saw.
Prints the tuning time and the suite's R@1/R@10/mAP@10 for the untuned and the tuned embedder, at image
level and at product level (how search ranks: `best`, the default, and `mean3`); the vectors are cached,
so the product-level figures cost no embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from suites import suites

from lookalike.eval import evaluate, tune_on_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=["1", "5"], default="1")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a TuneOptions field")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="pipeline option for eval")
    ap.add_argument("--json")
    args = ap.parse_args()
    options = dict(o.split("=", 1) for o in args.option)
    config = dict(c.split("=", 1) for c in args.config)
    suite = suites()[args.suite]
    labels, root, tune_rows, query, gallery = suite.labels, suite.root, suite.tune_on, suite.query, suite.gallery

    def measure(extra: dict) -> dict:
        return {rank: evaluate(labels, root, "product", query, gallery, {**config, **extra, "whiten": "0",
                                                                         "rank": rank}).metrics
                for rank in ("image", "best", "mean3")}  # fmt: skip

    untuned = measure({})
    t0 = time.perf_counter()
    model, report = tune_on_rows(labels, root, "product", tune_rows, options, config)
    seconds = time.perf_counter() - t0
    tuned = measure({"embedder": str(model)})
    machine = (
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    out = {"suite": args.suite, "options": options, "config": config, "tune_seconds": round(seconds, 1),
           "report": report, "untuned": untuned, "tuned": tuned, "machine": machine}  # fmt: skip
    for name, by_rank in (("untuned", untuned), ("tuned", tuned)):
        for rank, m in by_rank.items():
            print(f"suite {args.suite} {name} ({rank}): R@1 {m['recall@1']:.4f}  R@10 {m['recall@10']:.4f}  "
                  f"mAP@10 {m['mAP@10']:.4f}")  # fmt: skip
    print(f"tuning took {seconds / 60:.1f} min ({report})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
