"""Indexing throughput against what the models allow, where the time goes, and search latency.

    python benchmarks/speed.py [--sets mrstepup_multiview,sneakers50] [--images 500]
                               [--catalog-images 10000] [--big-images 100000] [--queries 300]

For each set, in one run with the same models and threads:
- end to end: `Catalog.index` on a fresh catalog (read, hash, decode, detect, crop, embed, write;
  2 worker threads), images/s;
- model only: the same images' detector and embedder inputs made beforehand, then only the two
  ONNX Runtime sessions run, on the same 2 workers; the end-to-end share of it is the target;
- a per-stage profile: one worker, each pipeline function timed where it is called (read, hash,
  decode, detector input / model / output, crop, embedder input / model, write);
- threading: model-only throughput for (workers x intra-op threads) 2x1, 1x2, 2x2.
Search: p50/p95 from image bytes (`sneakers50` shopper photos) on a catalog of `--catalog-images`
real `shoe_sandal_boot` photos, then on `--big-images` (the real vectors plus noisy copies of them,
since embedding 100k photos takes hours here). HNSW recall@10 against exact on the real vectors.
Prints Markdown tables and writes benchmarks/out/speed.json.
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
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lookalike import Catalog
from lookalike import crop as crop_module
from lookalike import encoder as encoder_module
from lookalike import images as images_module
from lookalike import records as records_module
from lookalike.config import PipelineConfig
from lookalike.encoder import Encoder
from lookalike.records import ImageRecord
from lookalike.sources import Item
from lookalike.storage import Storage

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


def set_items(dataset: str, n: int) -> list[Item]:
    """n images of a set as catalog items; a set smaller than n is listed again under new product ids
    (each copy is a new catalog image, embedded again)."""
    files = [str(DATASETS / dataset / r["file"]) for r in labelled(dataset)]
    return [Item(f"p{i // len(files)}-{i % len(files)}", files[i % len(files)]) for i in range(n)]


# -- the per-stage profile: each pipeline function timed where the pipeline calls it -------------------
class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return timed


class TimedSession:
    """An ONNX Runtime session whose `run` is timed (the rest of a model call is its Python side)."""

    def __init__(self, inner, timers: Timers, name: str):
        self.inner, self.run = inner, timers.wrap(name, inner.run)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@contextmanager
def patched(target, name: str, value):
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


def profile(items: list[Item], tmp: Path) -> dict[str, float]:
    """ms per image of each stage, one worker thread (so stages do not overlap)."""
    t = Timers()
    with Catalog.open(tmp / "profile", create=True, threads=1) as cat:
        cat.index(items[:5], prune=False)  # models loaded outside the timing
        models = cat.encoder.models
        det, emb = models.detector, models.embedder
        det.session, emb.session = (
            TimedSession(det.session, t, "detector model"),
            TimedSession(emb.session, t, "embedder model"),
        )
        with (
            patched(images_module, "read_bytes", t.wrap("read", images_module.read_bytes)),
            patched(encoder_module, "read_photo", t.wrap("read + hash", images_module.read_photo)),
            patched(images_module, "decode", t.wrap("decode", images_module.decode)),
            patched(type(det), "__call__", t.wrap("detector (all)", type(det).__call__)),
            patched(encoder_module, "choose_crop", t.wrap("crop", crop_module.choose_crop)),
            patched(type(emb), "__call__", t.wrap("embedder (all)", type(emb).__call__)),
            patched(records_module.Records, "add", t.wrap("write", records_module.Records.add)),
        ):  # fmt: skip
            t0 = time.perf_counter()
            cat.index(items[5:], prune=False)
            total = time.perf_counter() - t0
        det.session, emb.session = det.session.inner, emb.session.inner
    n = len(items) - 5
    ms = {k: v / n * 1000 for k, v in t.seconds.items()}
    out = {
        "read": ms["read"], "hash": ms["read + hash"] - ms["read"], "decode": ms["decode"],
        "detector input + output": ms["detector (all)"] - ms["detector model"], "detector model": ms["detector model"],
        "crop": ms["crop"],
        "embedder input + pooling": ms["embedder (all)"] - ms["embedder model"], "embedder model": ms["embedder model"],
        "write": ms["write"],
    }  # fmt: skip
    out["other (Python glue)"] = total / n * 1000 - sum(out.values())
    out["total"] = total / n * 1000
    return {k: round(v, 2) for k, v in out.items()}


# -- model only -------------------------------------------------------------------------------------
def model_inputs(items: list[Item]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each image's detector and embedder input tensors, made by the pipeline's own code."""
    enc = Encoder(PipelineConfig(), threads=1)
    det, emb = enc.models.detector, enc.models.embedder
    out = []
    for it in items:
        img = enc.load(it.image)
        out.append((det.input_tensor(img), emb.preprocess(enc.crop(img).image)[None]))
    return out


def model_only(inputs: list[tuple[np.ndarray, np.ndarray]], workers: int, threads: int) -> float:
    """images/s running only the two sessions over prepared inputs."""
    enc = Encoder(PipelineConfig(), threads=threads)
    det, emb = enc.models.detector, enc.models.embedder

    def one(pair):
        det.session.run(None, {det.input_name: pair[0]})
        emb.session.run(None, {emb.input_name: pair[1]})

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, inputs[:8]))  # warm-up
        t0 = time.perf_counter()
        list(pool.map(one, inputs))
        return len(inputs) / (time.perf_counter() - t0)


def end_to_end(items: list[Item], tmp: Path, name: str, threads: int) -> float:
    with Catalog.open(tmp / name, create=True, threads=threads) as cat:
        cat.index(items[:8], prune=False, source_name="warm-up")  # load the models first
        t0 = time.perf_counter()
        report = cat.index(items[8:], prune=False)
        dt = time.perf_counter() - t0
    assert report.added == len(items) - 8, report.failed[:3]
    return (len(items) - 8) / dt


# -- search -----------------------------------------------------------------------------------------
def latency(cat: Catalog, queries: list[bytes]) -> tuple[float, float]:
    for q in queries[:5]:
        cat.search(q, k=10)  # warm-up (and the index build of a large catalog)
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        cat.search(q, k=10)
        lat.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(lat), 1), round(float(np.percentile(lat, 95)), 1)


def grow(directory: Path, total: int, rng: np.random.Generator) -> None:
    """Add noisy copies of the catalog's real vectors until it holds `total` images."""
    db = Storage(directory)
    real = db.records.vectors()
    have = len(real)
    while have < total:
        n = min(10_000, total - have)
        base = real[rng.integers(0, len(real), n)]
        noisy = base + rng.normal(0, 0.02, base.shape).astype(np.float32)
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        db.records.add([ImageRecord(f"synthetic-{(have + i) // 3}", f"synthetic/{have + i}.jpg", f"{have + i:064x}", v)
                for i, v in enumerate(noisy)])  # fmt: skip
        have += n
    db.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="mrstepup_multiview,sneakers50")
    ap.add_argument("--images", type=int, default=500, help="images per set (a smaller set is repeated)")
    ap.add_argument("--catalog-images", type=int, default=10_000)
    ap.add_argument("--big-images", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rng = random.Random(0)
    out: dict = {"machine": machine(), "sets": {}}

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for dataset in args.sets.split(","):
            items = set_items(dataset, args.images)
            inputs = model_inputs(items)
            row = {"images": len(items)}
            row["end_to_end_per_s"] = round(end_to_end(items, tmp, dataset, args.threads), 1)
            row["model_only_per_s"] = round(model_only(inputs, args.threads, 1), 1)
            row["share_of_model_only"] = round(row["end_to_end_per_s"] / row["model_only_per_s"], 3)
            row["threading_model_only_per_s"] = {
                f"{w}x{t}": round(model_only(inputs, w, t), 1) for w, t in ((2, 1), (1, 2), (2, 2))
            }
            row["profile_ms"] = profile(items[: min(200, len(items))], tmp / f"p-{dataset}")
            out["sets"][dataset] = row
            print(dataset, json.dumps(row))

        ssb = labelled("shoe_sandal_boot")
        rng.shuffle(ssb)
        wild = [r for r in labelled("sneakers50") if r["scene"] == "wild"]
        queries = [(DATASETS / "sneakers50" / r["file"]).read_bytes() for r in rng.sample(wild, args.queries)]
        big = tmp / "big"
        with Catalog.open(big, create=True, threads=args.threads) as cat:
            cat.index([Item(f"{r['category']}/{Path(r['file']).stem}", str(DATASETS / "shoe_sandal_boot" / r["file"]))
                       for r in ssb[: args.catalog_images]])  # fmt: skip
            out["search"] = {"catalog_images": cat.info()["images"]}
            out["search"]["p50_ms"], out["search"]["p95_ms"] = latency(cat, queries)
            vectors = [cat.embed(q) for q in queries[:200]]
        print("search", out["search"])

        exact, hnsw = Storage(big, large_from=10**9), Storage(big, large_from=1, large="hnsw")
        truth = [{h.image for h in exact.search(v, 10)} for v in vectors]
        out["hnsw"] = []
        for ef in (64, 128, 256):
            hnsw.live.index().ef_search = ef
            hits, t0 = 0, time.perf_counter()
            for v, expected in zip(vectors, truth, strict=True):
                hits += len({h.image for h in hnsw.search(v, 10)} & expected)
            ms = (time.perf_counter() - t0) / len(vectors) * 1000
            out["hnsw"].append(
                {"ef_search": ef, "recall_at_10": round(hits / (10 * len(vectors)), 4), "ms": round(ms, 2)}
            )
        exact.close(), hnsw.close()

        if args.big_images > out["search"]["catalog_images"]:
            grow(big, args.big_images, np.random.default_rng(0))
            with Catalog.open(big, threads=args.threads) as cat:
                out["search_big"] = {"catalog_images": cat.info()["images"]}
                out["search_big"]["p50_ms"], out["search_big"]["p95_ms"] = latency(cat, queries)
            print("search_big", out["search_big"])

    print(f"\nMachine: {out['machine']}\n")
    print("| set | images | end to end | model only | share | 2x1 / 1x2 / 2x2 model only |\n|---|---|---|---|---|---|")
    for name, r in out["sets"].items():
        th = r["threading_model_only_per_s"]
        print(f"| {name} | {r['images']} | {r['end_to_end_per_s']} | {r['model_only_per_s']} | "
              f"{r['share_of_model_only']:.0%} | {th['2x1']} / {th['1x2']} / {th['2x2']} |")  # fmt: skip
    stages = list(next(iter(out["sets"].values()))["profile_ms"])
    print("\n| stage (ms per image, one worker) | " + " | ".join(out["sets"]) + " |")
    print("|---|" + "---|" * len(out["sets"]))
    for s in stages:
        print(f"| {s} | " + " | ".join(str(r["profile_ms"][s]) for r in out["sets"].values()) + " |")
    for key in ("search", "search_big"):
        if key in out:
            print(f"\nsearch from image bytes, {out[key]['catalog_images']} images: p50 {out[key]['p50_ms']} ms, "
                  f"p95 {out[key]['p95_ms']} ms")  # fmt: skip
    for h in out["hnsw"]:
        print(f"HNSW efSearch={h['ef_search']}: recall@10 {h['recall_at_10']}, {h['ms']} ms")
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "speed.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
