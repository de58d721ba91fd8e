"""Indexing throughput: this machine's threads (the local path) against Ray Data actors (`index --ray`)
with 1 and 2 workers, on the same source, each into a fresh catalog, each in its own process.

    bin/python benchmarks/ray_indexing.py [--source DIR] [--limit N] --json OUT

The source defaults to all of sneakers50 (a folder per product). Ray's start-up (a local Ray
instance) is timed apart from the indexing, which is timed from the call to the last record stored:
a cluster is normally up before a job. The catalogs are compared row by row (ids, hashes, crops,
boxes) and vector by vector.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import machine  # noqa: E402
from suites import DATASETS, emit  # noqa: E402

from lookalike import Catalog  # noqa: E402

RUNS = {"local": None, "ray-1": 1, "ray-2": 2}


def run(name: str, source: Path, catalog: Path) -> dict:
    workers = RUNS[name]
    out: dict = {"run": name}
    if workers is not None:
        from lookalike.cluster import RayRunner

        t0 = time.perf_counter()
        RayRunner("local", workers).start()
        out["ray_start_s"] = round(time.perf_counter() - t0, 1)
    with Catalog.open(catalog, create=True) as cat:
        t0 = time.perf_counter()
        report = cat.index(source, ray="local" if workers else None, workers=workers)
        seconds = time.perf_counter() - t0
    out.update({"images": report.added, "failed": len(report.failed), "index_s": round(seconds, 1),
                "images_per_s": round(report.added / seconds, 2)})  # fmt: skip
    return out


def compare(a: Path, b: Path) -> dict:
    q = "SELECT id, product_id, image, sha256, crop, box, vector FROM images ORDER BY id"
    ra, rb = (sqlite3.connect(p / "catalog.db").execute(q).fetchall() for p in (a, b))
    if len(ra) != len(rb):
        return {"same_rows": False, "images": [len(ra), len(rb)]}
    pairs = list(zip(ra, rb, strict=True))
    diff = max((float(np.abs(np.frombuffer(x[6], np.float32) - np.frombuffer(y[6], np.float32)).max())
                for x, y in pairs), default=0.0)  # fmt: skip
    return {"same_rows": all(x[:6] == y[:6] for x, y in pairs), "max_vector_diff": diff,
            "bitwise": all(x[6] == y[6] for x, y in pairs)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, default=DATASETS / "sneakers50" / "data")
    ap.add_argument("--limit", type=int, help="only the first N products (a quick look)")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--catalog", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run(args.run, args.source, args.catalog)))
        return
    out: dict = {"machine": machine(),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lookalike-ray-") as tmp:
        source = args.source
        if args.limit:
            source = Path(tmp) / "source"
            for product in sorted(args.source.iterdir())[: args.limit]:
                (source / product.name).mkdir(parents=True)
                for photo in product.iterdir():
                    (source / product.name / photo.name).symlink_to(photo)
        out["source"] = str(args.source) + (f" (first {args.limit} products)" if args.limit else "")
        for name in args.runs.split(","):
            child = subprocess.run([sys.executable, __file__, "--run", name, "--source", str(source),
                                    "--catalog", str(Path(tmp) / name)], capture_output=True, text=True)  # fmt: skip
            if child.returncode != 0:
                raise SystemExit(f"{name} failed:\n{child.stderr[-3000:]}")
            out["runs"][name] = json.loads(child.stdout.strip().splitlines()[-1])
            print(name, out["runs"][name], file=sys.stderr, flush=True)
        local = out["runs"].get("local")
        for name, row in out["runs"].items():
            if name != "local" and local:
                row["vs_local"] = round(row["images_per_s"] / local["images_per_s"], 3)
                row["same_catalog"] = compare(Path(tmp) / "local", Path(tmp) / name)
    emit(out, args.json)


if __name__ == "__main__":
    main()
