"""Tuning on sneakers50, measured honestly: what is learned comes only from catalog rows.

    python benchmarks/tune.py [--suite 1|5] [--option KEY=VALUE ...] [--json OUT]

Suite 1 (closed set): tune on the catalog shots (scene=catalog) of all 50 products, evaluate shopper
photos (scene=wild) against those catalog shots. Suite 5 (open set): tune on the catalog shots of the
first 25 products (sorted by id), evaluate shopper -> catalog on the other 25, which tuning never saw.
Prints the tuning time and the suite's R@1/R@10/mAP@10 for the untuned and the tuned embedder.
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

    untuned = evaluate(labels, root, "product", query, gallery, {**config, "whiten": "0"}).metrics
    t0 = time.perf_counter()
    model, report = tune_on_rows(labels, root, "product", tune_rows, options, config)
    seconds = time.perf_counter() - t0
    tuned = evaluate(labels, root, "product", query, gallery, {**config, "embedder": str(model), "whiten": "0"}).metrics
    machine = (
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    out = {"suite": args.suite, "options": options, "config": config, "tune_seconds": round(seconds, 1),
           "report": report, "untuned": untuned, "tuned": tuned, "machine": machine}  # fmt: skip
    for name, m in (("untuned", untuned), ("tuned", tuned)):
        print(
            f"suite {args.suite} {name}: R@1 {m['recall@1']:.3f}  R@10 {m['recall@10']:.3f}  mAP@10 {m['mAP@10']:.3f}"
        )
    print(f"tuning took {seconds / 60:.1f} min ({report})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
