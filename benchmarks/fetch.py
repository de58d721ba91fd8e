"""Indexing from image URLs against the same images from files, and a re-index of an unchanged feed.

    python benchmarks/fetch.py [--images 2000] [--latency-ms 150] [--fail-share 0.05] [--threads 2]

A local HTTP server (its own process at a lower priority, standing in for a CDN whose CPU is not this
machine's; threads, kept-alive connections, no Nagle delay, ETag / Last-Modified and 304) serves
sneakers50 photos, sleeping `--latency-ms` before each answer (a CDN's round trip) and answering
`--fail-share` of the paths 503 once (no Retry-After: the client's backoff decides). In one run, on
fresh catalogs with the same models and threads:
1. `Catalog.index` of a manifest of the files: images/s (what the models allow here);
2. `Catalog.index` of the same manifest as URLs (1 and 2 alternately, `--rounds` times;
   `allow_private_urls`, as an intranet shop would run `index --allow-private-urls`): images/s, its
   share of (1), every image indexed, peak memory, CPU seconds of this process and of the server;
3. the URL manifest indexed again, unchanged: requests, bytes downloaded, images embedded;
4. with `--ray N`: the files and the URLs once each on Ray Data with N workers (Ray started each time).
Writes benchmarks/out/fetch.json.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import http.server
import json
import multiprocessing
import os
import random
import resource
import tempfile
import threading
import time
from pathlib import Path

from suites import DATASETS, OUT

from lookalike import Catalog
from lookalike.images import Limits


def serve(files: list[str], latency: float, fail_share: float, port: multiprocessing.Value, stats) -> None:
    """The image server (run in a child process): /N is files[N]."""
    failing = set(random.Random(0).sample(range(len(files)), int(len(files) * fail_share)))
    failed: set[str] = set()
    lock = threading.Lock()

    os.nice(10)  # a CDN's CPU is not this machine's: the server yields the 2 cores to the indexing measured

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # as real servers do: without it, the body written after the headers waits for the client's
        # delayed ACK (Nagle's algorithm), 40 ms a response on loopback
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(latency)
            n = int(self.path.strip("/").split(".")[0])
            with lock:  # each round's URLs (?round=N) fail once
                stats[0] += 1
                fail = n in failing and self.path not in failed
                failed.add(self.path)
            if fail:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = Path(files[n]).read_bytes()
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            with lock:
                stats[1] += len(data)
            self.send_response(200)
            self.send_header("ETag", etag)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    http.server.ThreadingHTTPServer.daemon_threads = True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port.value = httpd.server_address[1]
    httpd.serve_forever()


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds used so far by this process (None) or by the process `pid` (the server)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def manifest(rows: list[dict], path: Path, image) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "image"])
        for n, r in enumerate(rows):
            w.writerow([r["product"], image(n, r)])
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--latency-ms", type=float, default=150)
    ap.add_argument("--fail-share", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ray", type=int, default=0, help="also files and URLs once each on Ray with N workers")
    ap.add_argument("--json", type=Path, default=OUT / "fetch.json")
    args = ap.parse_args()
    with open(DATASETS / "sneakers50" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[: args.images]
    files = [str(DATASETS / "sneakers50" / r["file"]) for r in rows]
    port, stats = multiprocessing.Value("i", 0), multiprocessing.Array("q", 2)
    server = multiprocessing.Process(target=serve, args=(files, args.latency_ms / 1000, args.fail_share, port, stats),
                                     daemon=True)  # fmt: skip
    server.start()
    while not port.value:
        time.sleep(0.05)
    out: dict = {"images": len(rows), "latency_ms": args.latency_ms, "fail_share": args.fail_share,
                 "threads": args.threads}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local = manifest(rows, tmp / "local.csv", lambda n, r: files[n])
        urls = [manifest(rows, tmp / f"urls{k}.csv", lambda n, r, k=k: f"http://127.0.0.1:{port.value}/{n}.jpg?round={k}")
                for k in range(args.rounds)]  # fmt: skip
        with Catalog.open(tmp / "warm", create=True) as cat:  # models loaded and warm before timing
            cat.index(manifest(rows[:16], tmp / "warm.csv", lambda n, r: files[n]))
        shares = []
        for n in range(args.rounds):  # files then URLs, alternately: the machine's noise hits both
            for name, source in (("files", local), ("urls", urls[n])):
                limits = Limits(allow_private_urls=True)
                with Catalog.open(tmp / f"{name}{n}", create=True, threads=args.threads, limits=limits) as cat:
                    t0, ours, theirs = time.perf_counter(), cpu_s(), cpu_s(server.pid)
                    report = cat.index(source)
                    seconds = time.perf_counter() - t0
                    ours, theirs = cpu_s() - ours, cpu_s(server.pid) - theirs
                rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
                out[f"{name}{n}"] = {"images_per_s": round(len(rows) / seconds, 2), "seconds": round(seconds, 1),
                                     "added": report.added, "failed": len(report.failed),
                                     "downloads": report.downloads, "peak_rss_mb": rss,
                                     "cpu_s": round(ours, 1), "server_cpu_s": round(theirs, 1)}  # fmt: skip
                print(f"{name}{n}", json.dumps(out[f"{name}{n}"]), flush=True)
            shares.append(round(out[f"urls{n}"]["images_per_s"] / out[f"files{n}"]["images_per_s"], 3))
        out["urls_share_of_files"] = shares
        if args.ray:  # Ray Data: the URLs' fetch stage before the actors, against the files
            fresh = manifest(rows, tmp / "ray.csv", lambda n, r: f"http://127.0.0.1:{port.value}/{n}.jpg?round=ray")
            for name, source in (("ray_files", local), ("ray_urls", fresh)):  # its URLs fail once too
                limits = Limits(allow_private_urls=True)
                with Catalog.open(tmp / name, create=True, limits=limits) as cat:
                    t0 = time.perf_counter()
                    report = cat.index(source, ray="local", workers=args.ray)  # includes starting Ray
                    seconds = time.perf_counter() - t0
                out[name] = {"images_per_s": round(len(rows) / seconds, 2), "seconds": round(seconds, 1),
                             "added": report.added, "failed": len(report.failed)}  # fmt: skip
                print(name, json.dumps(out[name]), flush=True)
            share = out["ray_urls"]["images_per_s"] / out["ray_files"]["images_per_s"]
            out["ray_urls_share_of_files"] = round(share, 3)
        before = (stats[0], stats[1])
        with Catalog.open(tmp / "urls0", threads=args.threads, limits=Limits(allow_private_urls=True)) as cat:
            t0 = time.perf_counter()
            again = cat.index(urls[0])
        out["reindex"] = {"seconds": round(time.perf_counter() - t0, 1), "requests": stats[0] - before[0],
                          "bytes_downloaded": stats[1] - before[1], "embedded": again.processed,
                          "unchanged": again.unchanged, "downloads": again.downloads}  # fmt: skip
    server.terminate()
    print(json.dumps(out, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
