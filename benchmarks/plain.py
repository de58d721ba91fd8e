"""Catalog shots on plain backgrounds: indexing throughput with and without `crop.plain` (issue 26).

    python benchmarks/plain.py [--images 600] [--rounds 2]
    python benchmarks/suites.py --config crop.plain=1     # the suites with it (the worst-case rule)

`Catalog.index` of sneakers50's catalog shots (scene=catalog: product shots, most of them on white) on
fresh catalogs, the default pipeline and `crop.plain=1` alternately (`--rounds` each, models warm),
2 threads: images/s, and how many photos skipped the detector (crop path "nonwhite").
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from suites import DATASETS, OUT

from lookalike import Catalog
from lookalike.config import PipelineConfig
from lookalike.sources import Item


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=OUT / "plain.json")
    args = ap.parse_args()
    with open(DATASETS / "sneakers50" / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["scene"] == "catalog"][: args.images]
    items = [Item(r["product"], str(DATASETS / "sneakers50" / r["file"])) for r in rows]
    configs = {"default": PipelineConfig(), "crop.plain=1": PipelineConfig().with_options({"crop.plain": "1"})}
    out: dict = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        with Catalog.open(Path(tmp) / "warm", create=True) as cat:  # models loaded once before timing
            cat.index(items[:16], source_name="warm")
        for n in range(args.rounds):
            for name, config in configs.items():
                with Catalog.open(Path(tmp) / f"{name}-{n}", config=config, create=True) as cat:
                    t0 = time.perf_counter()
                    report = cat.index(items, source_name="bench")
                    seconds = time.perf_counter() - t0
                out[name].append({"images_per_s": round(len(items) / seconds, 2), "crops": report.crops})
                print(name, json.dumps(out[name][-1]), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
