"""Indexing throughput and search latency, end to end, on the shared datasets.

    python benchmarks/speed.py [--index-images 1000] [--catalog-images 10000] [--queries 300]

Indexing: images/s for a fresh catalog of `shoe_sandal_boot` images (read, hash, decode, detect,
crop, embed, store). Search: p50/p95 from image bytes (decode, detect, crop, embed, FAISS search,
group by product) against a catalog of `--catalog-images` images, with shopper photos from
`sneakers50`. Also HNSW recall@10 against exact search on the same real vectors.
Prints a Markdown table and writes benchmarks/out/speed.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike import Catalog
from lookalike.catalog import CatalogDB
from lookalike.sources import Item

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", ROOT.parent / "shared" / "datasets")).resolve()


def machine() -> str:
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (StopIteration, OSError):
        cpu = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()}"


def labelled(dataset: str) -> list[dict]:
    with open(DATASETS / dataset / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def items(rows: list[dict], dataset: str, label: str) -> list[Item]:
    return [Item(f"{r[label]}/{Path(r['file']).stem}", str(DATASETS / dataset / r["file"])) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index-images", type=int, default=1000)
    ap.add_argument("--catalog-images", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rng = random.Random(0)
    ssb = labelled("shoe_sandal_boot")
    rng.shuffle(ssb)
    out: dict = {"machine": machine()}

    with tempfile.TemporaryDirectory() as tmp:
        # 1. indexing throughput on a fresh catalog
        with Catalog.open(Path(tmp) / "throughput", create=True, threads=args.threads) as cat:
            cat.index(items(ssb[:20], "shoe_sandal_boot", "category"))  # load the models first
            batch = items(ssb[20 : 20 + args.index_images], "shoe_sandal_boot", "category")
            t0 = time.perf_counter()
            report = cat.index(batch, prune=False)
            dt = time.perf_counter() - t0
        assert report.added == len(batch), report.failed[:3]
        out["index_images"] = len(batch)
        out["index_images_per_s"] = round(len(batch) / dt, 1)
        print(f"indexing: {len(batch)} images in {dt:.1f} s = {len(batch) / dt:.1f} images/s")

        # 2. search latency against a larger catalog
        big = Path(tmp) / "big"
        with Catalog.open(big, create=True, threads=args.threads) as cat:
            t0 = time.perf_counter()
            report = cat.index(items(ssb[: args.catalog_images], "shoe_sandal_boot", "category"))
            print(f"built a {report.added}-image catalog in {time.perf_counter() - t0:.0f} s")
            wild = [r for r in labelled("sneakers50") if r["scene"] == "wild"]
            queries = [(DATASETS / "sneakers50" / r["file"]).read_bytes() for r in rng.sample(wild, args.queries)]
            for q in queries[:5]:
                cat.search(q, k=10)  # warm-up
            lat = []
            for q in queries:
                t0 = time.perf_counter()
                cat.search(q, k=10)
                lat.append((time.perf_counter() - t0) * 1000)
            out["catalog_images"] = cat.store.count()[1]
            out["search_ms_p50"] = round(statistics.median(lat), 1)
            out["search_ms_p95"] = round(float(np.percentile(lat, 95)), 1)
            print(f"search: p50 {out['search_ms_p50']} ms, p95 {out['search_ms_p95']} ms over {len(lat)} queries")

            # 3. HNSW against exact on the same real vectors
            vectors = [cat.embed(q) for q in queries[:200]]
        exact = CatalogDB(big, hnsw_threshold=10**9)
        hnsw = CatalogDB(big, hnsw_threshold=1)
        truth, t0 = [], time.perf_counter()
        for v in vectors:
            truth.append({h.image for h in exact.search(v, 10)})
        out["exact_search_ms"] = round((time.perf_counter() - t0) / len(vectors) * 1000, 2)
        out["hnsw"] = []
        for ef in (64, 128, 256):
            hnsw._ensure_index().ef_search = ef
            hits, t0 = 0, time.perf_counter()
            for v, expected in zip(vectors, truth, strict=True):
                hits += len({h.image for h in hnsw.search(v, 10)} & expected)
            ms = (time.perf_counter() - t0) / len(vectors) * 1000
            out["hnsw"].append(
                {"ef_search": ef, "recall_at_10": round(hits / (10 * len(vectors)), 4), "ms": round(ms, 2)}
            )
            print(f"HNSW efSearch={ef}: recall@10 vs exact {out['hnsw'][-1]['recall_at_10']}, {ms:.2f} ms")

    print()
    print(f"Machine: {out['machine']}")
    print()
    print("| measure | value |\n|---|---|")
    print(f"| indexing throughput ({out['index_images']} `shoe_sandal_boot` images, end to end) "
          f"| {out['index_images_per_s']} images/s |")  # fmt: skip
    print(f"| search latency p50 / p95 (from image bytes, {out['catalog_images']}-image catalog) "
          f"| {out['search_ms_p50']} / {out['search_ms_p95']} ms |")  # fmt: skip
    print(f"| vector search alone, exact | {out['exact_search_ms']} ms |")
    for h in out["hnsw"]:
        print(
            f"| HNSW (M=32) efSearch={h['ef_search']}: recall@10 against exact / time "
            f"| {h['recall_at_10']} / {h['ms']} ms |"
        )
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "speed.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
