"""Load test of the REST API: `lookalike serve` in its own process on loopback, and N concurrent
clients (this process) sending image searches. Bounded: a fixed number of requests and a time limit.

    python benchmarks/load.py [--requests 2000] [--clients 8] [--catalog-images 2000] [--server-threads 1]

Checks that every request succeeded and prints throughput and latency percentiles (client-side,
upload to parsed JSON). Writes benchmarks/out/load.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from lookalike import Catalog
from lookalike.sources import Item

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", ROOT.parent / "shared" / "datasets")).resolve()
sys.path.insert(0, str(ROOT / "benchmarks"))
from speed import machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--catalog-images", type=int, default=2000)
    ap.add_argument("--server-threads", type=int, default=1, help="inference threads per request")
    ap.add_argument("--time-limit", type=float, default=600)
    args = ap.parse_args()
    rng = random.Random(0)
    with open(DATASETS / "shoe_sandal_boot" / "labels.csv", newline="") as f:
        ssb = list(csv.DictReader(f))
    rng.shuffle(ssb)
    with open(DATASETS / "sneakers50" / "labels.csv", newline="") as f:
        wild = [r for r in csv.DictReader(f) if r["scene"] == "wild"]
    queries = [(DATASETS / "sneakers50" / r["file"]).read_bytes() for r in rng.sample(wild, 200)]

    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "cat"
        with Catalog.open(catalog, create=True) as cat:
            cat.index([Item(r["category"] + "/" + Path(r["file"]).stem, str(DATASETS / "shoe_sandal_boot" / r["file"]))
                       for r in ssb[: args.catalog_images]])  # fmt: skip
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "lookalike.cli", "serve", "--catalog", str(catalog), "--port", str(port),
             "--threads", str(args.server_threads)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).json().get("models_loaded"):
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)

            latencies: list[float] = []
            errors: list[str] = []
            counter = iter(range(args.requests))
            lock = threading.Lock()
            stop_at = time.time() + args.time_limit

            def client() -> None:
                with httpx.Client(timeout=60) as http:
                    while time.time() < stop_at:
                        with lock:
                            n = next(counter, None)
                        if n is None:
                            return
                        t0 = time.perf_counter()
                        try:
                            r = http.post(url + "/search", files={"image": ("q.jpg", queries[n % len(queries)])},
                                          data={"k": "10"})  # fmt: skip
                            ok = r.status_code == 200 and len(r.json()["results"]) == 10
                        except (httpx.HTTPError, ValueError) as e:
                            ok, r = False, e
                        dt = (time.perf_counter() - t0) * 1000
                        with lock:
                            latencies.append(dt)
                            if not ok:
                                errors.append(str(getattr(r, "text", r))[:200])

            t0 = time.perf_counter()
            workers = [threading.Thread(target=client) for _ in range(args.clients)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - t0
        finally:
            server.terminate()
            server.wait(timeout=30)

    out = {
        "machine": machine(),
        "requests": len(latencies),
        "clients": args.clients,
        "catalog_images": args.catalog_images,
        "server_threads": args.server_threads,
        "errors": len(errors),
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(statistics.median(latencies), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
    }
    print(json.dumps(out, indent=2))
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "load.json").write_text(json.dumps(out, indent=2))
    if errors or len(latencies) < args.requests:
        raise SystemExit(f"{len(errors)} errors, {len(latencies)}/{args.requests} requests done: {errors[:3]}")


if __name__ == "__main__":
    main()
