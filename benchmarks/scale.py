"""A catalog of N images on this machine: build, open, RAM and disk per image, search latency and
recall@10 against exact search, filtered search, adding and deleting (issue 13).

    bin/python benchmarks/scale.py --images 1000000 --json benchmarks/out/scale-1m.json
    bin/python benchmarks/scale.py --images 100000 --stores compact,hnsw --json benchmarks/out/scale-100k.json
    bin/python benchmarks/scale.py --suites      # suites 1-4: R@1 through the compact index vs exact

Vectors: real ones (`--real` shoe_sandal_boot catalog photos, embedded by the shipped pipeline, cached
in the eval cache) and, to reach N, new ones made from them (`Copies`: mixes of two real vectors moved
along the real vectors' principal directions); embedding a million photos would take hours on 2
cores. Queries: real shopper photos (sneakers50, scene=wild: another domain than the catalog, as in
use), never part of the catalog.
Each store is measured in a fresh process, so its RAM is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import machine  # noqa: E402
from suites import DATASETS, OUT, suites  # noqa: E402

from lookalike.config import PipelineConfig  # noqa: E402
from lookalike.eval import parse_where, read_labels  # noqa: E402
from lookalike.offline import Photos, default_cache  # noqa: E402
from lookalike.records import ImageRecord  # noqa: E402
from lookalike.storage import Storage  # noqa: E402

IMAGES_PER_PRODUCT = 3
BRANDS = 100  # the filter `brand=b07` matches 1% of products
CHUNK = 20_000
# share of products allowed -> (the filter, which products it allows); prices are product % 200
FILTERS = {
    "1%": ({"brand": "b07"}, lambda product: product % BRANDS == 7),
    "10%": ({"price": "0..19"}, lambda product: product % 200 < 20),
    "90%": ({"price": "..179"}, lambda product: product % 200 < 180),
}
# compact: the local default; hnsw: the local store before issue 13 (HNSW over float32); milvus: Milvus
# Lite in a file beside the catalog, the vectors moved there with `store migrate` (issue 14);
# milvus-server: a Milvus server (--milvus ADDRESS, or the embedded standalone server of PyPI's `milvus`
# package started here), with its default there (IVF_FLAT, issue 23)
STORES = {"compact": {}, "hnsw": {"large": "hnsw"}, "milvus": {}, "milvus-ivf": {"index_type": "IVF_FLAT"},
          "milvus-server": {}}  # fmt: skip


def real_vectors(n_base: int, n_queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(catalog vectors, shopper-photo queries, catalog-photo queries: other photos of the same set,
    not in the catalog, as a "more like this" or a clean product shot would search)."""
    photos = Photos(PipelineConfig(), 2, default_cache())
    rows = read_labels(DATASETS / "shoe_sandal_boot" / "labels.csv", DATASETS / "shoe_sandal_boot", "category")
    base, _ = photos.vectors([r["__path__"] for r in rows[:n_base]])
    s50 = read_labels(DATASETS / "sneakers50" / "labels.csv", DATASETS / "sneakers50", "product")
    wild = [r["__path__"] for r in s50 if parse_where("scene=wild")(r)]
    step = max(1, len(wild) // n_queries)
    queries, _ = photos.vectors(wild[::step][:n_queries])
    shots, _ = photos.vectors([r["__path__"] for r in rows[n_base : n_base + n_queries]])
    ok = lambda v: v[~np.isnan(v).any(axis=1)].astype(np.float32)  # noqa: E731
    return ok(base), ok(queries), ok(shots)


class Copies:
    """Deterministic chunks of N vectors: the real ones first, then new ones, each a random mix of two
    real vectors (weights 1 and U(0, 1)) moved along the real vectors' own principal directions: new
    shoes between existing ones, not hundreds of near-copies of each (which no catalog has, and which
    would make every index look worse than on real data). `spread` 0.8 makes a new vector's nearest
    neighbour as close as a real photo's is among the real ones (median cosine 0.87 both)."""

    def __init__(self, real: np.ndarray, total: int, spread: float = 0.8):
        self.real, self.total, self.spread = real, total, spread
        centred = real - real.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        self.shape = ((s / np.sqrt(len(real)))[:, None] * vt).astype(np.float32)

    def chunks(self):
        rng = np.random.default_rng(0)
        yield 0, self.real[: self.total]
        start = len(self.real)
        while start < self.total:
            n = min(CHUNK, self.total - start)
            a, b = self.real[rng.integers(0, len(self.real), n)], self.real[rng.integers(0, len(self.real), n)]
            v = a + rng.uniform(0, 1, (n, 1)).astype(np.float32) * b
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            v = v + self.spread * (rng.normal(size=(n, len(self.shape))).astype(np.float32) @ self.shape)
            yield start, v / np.linalg.norm(v, axis=1, keepdims=True)
            start += n


def product_of(i: int) -> int:
    return i // IMAGES_PER_PRODUCT


def fill(directory: Path, copies: Copies, queries: np.ndarray, shots: np.ndarray) -> tuple[float, dict]:
    """Write N images to a new catalog (SQLite only) and compute exact top-10s on the way."""
    db = Storage(directory)
    truth, shot_truth = TopK(queries, 10), TopK(shots, 10)
    filtered = {share: TopK(queries, 10) for share in FILTERS}
    t0 = time.perf_counter()
    for start, v in copies.chunks():
        ids = np.arange(start, start + len(v)).tolist()
        truth.update(v, np.array(ids) + 1)  # image ids are 1, 2, ... in insertion order
        shot_truth.update(v, np.array(ids) + 1)
        for share, (_, allowed) in FILTERS.items():
            keep = np.array([allowed(product_of(i)) for i in ids])
            filtered[share].update(v[keep], np.array(ids)[keep] + 1)
        db.records.add([ImageRecord(f"p{product_of(i)}", f"synthetic/{i}.jpg", f"{i:064x}", v[j],
                            metadata={"brand": f"b{product_of(i) % BRANDS:02d}", "price": product_of(i) % 200})
                for j, i in enumerate(ids)])  # fmt: skip
        if (start + len(v)) % 100_000 < CHUNK:
            print(f"  {start + len(v):,} images written", file=sys.stderr, flush=True)
    db.close()
    return time.perf_counter() - t0, {"truth": truth.ids, **{f"filtered_{s}": f.ids for s, f in filtered.items()},
                                      "shot_truth": shot_truth.ids,
                                      "shots": shots}  # fmt: skip


class TopK:
    def __init__(self, queries: np.ndarray, k: int):
        self.q, self.k = queries, k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.ids = np.zeros((len(queries), k), dtype=np.int64)

    def update(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if not len(ids):
            return
        s = self.q @ vectors.T
        all_s, all_i = np.hstack([self.scores, s]), np.hstack([self.ids, np.broadcast_to(ids, s.shape)])
        top = np.argsort(-all_s, axis=1)[:, : self.k]
        self.scores, self.ids = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)


def rss() -> dict[str, int]:
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def measure(directory: Path, options: dict, data: Path, images: int) -> dict:
    """In a fresh process: open, search, filter, add, delete."""
    d = np.load(data)
    queries, truth, extra = d["queries"], d["truth"], d["extra"]
    before = rss()
    t0 = time.perf_counter()
    db = Storage(directory, **options)
    db.search(queries[0], 10)
    out = {"open_s": round(time.perf_counter() - t0, 2), "kind": db.live.kind()}
    index = db.live.index()

    def run(passes: int, queries=queries, truth=truth) -> tuple[float, float, float]:
        lat, hits = [], 0
        for _ in range(passes):
            for q, t in zip(queries, truth, strict=True):
                t1 = time.perf_counter()
                found = db.search(q, 10)
                lat.append((time.perf_counter() - t1) * 1000)
                hits += len({int(h.image.rsplit("/", 1)[1].split(".")[0]) + 1 for h in found} & set(t.tolist()))
        return statistics.median(lat), float(np.percentile(lat, 99)), hits / (passes * 10 * len(queries))

    if hasattr(index, "nprobe"):  # the compact index's two knobs, measured on the same catalog
        default = index.nprobe, index.rerank
        out["sweep"] = []
        for index.nprobe, index.rerank in ((32, 400), (64, 400), (64, 1000), (128, 400), (128, 1000)):
            p50, p99, recall = run(1)
            out["sweep"].append({"nprobe": index.nprobe, "rerank": index.rerank, "p50_ms": round(p50, 2),
                                 "recall_at_10": round(recall, 4)})  # fmt: skip
        index.nprobe, index.rerank = default
    if getattr(index, "index_type", None) == "IVF_FLAT":  # Milvus: its IVF's nprobe
        from lookalike.index import milvus

        build, default = milvus.INDEXES["IVF_FLAT"]
        out["sweep"] = []
        for nprobe in (16, 32, 64, 128):
            milvus.INDEXES["IVF_FLAT"] = (build, lambda k, share, n=nprobe: {"nprobe": n})
            p50, p99, recall = run(1)
            out["sweep"].append({"nprobe": nprobe, "p50_ms": round(p50, 2), "recall_at_10": round(recall, 4)})
        milvus.INDEXES["IVF_FLAT"] = (build, default)
    p50, p99, recall = run(5)
    out["search_p50_ms"], out["search_p99_ms"], out["recall_at_10"] = round(p50, 2), round(p99, 2), round(recall, 4)
    if "shots" in d.files:  # catalog-photo queries: the catalog's own domain
        p50, p99, recall = run(2, d["shots"], d["shot_truth"])
        out["catalog_queries"] = {"p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "recall_at_10": round(recall, 4)}

    # filters allowing 1%, 10% and 90% of the products (a brand, a price range): as exact as unfiltered?
    def filtered(share: str) -> tuple[float, float]:
        where, allowed = FILTERS[share]
        lat, hits = [], 0
        for q, t in zip(queries, d[f"filtered_{share}"], strict=True):
            t1 = time.perf_counter()
            found = db.search(q, 10, where=where)
            lat.append((time.perf_counter() - t1) * 1000)
            hits += len({int(h.image.rsplit("/", 1)[1].split(".")[0]) + 1 for h in found} & set(t.tolist()))
            assert all(allowed(int(h.product_id[1:])) for h in found)
        worst[share] = round(float(np.percentile(lat, 99)), 2)
        return round(statistics.median(lat), 2), round(hits / (10 * len(queries)), 4)

    # each filter's first pass: its first search finds its rows, its second starts the copy of its own
    # lists (compact index) in a thread beside the searches, which use them once it is done (p99)
    out["filtered_p50_ms"], out["filtered_recall_at_10"], worst = {}, {}, {}
    for share in FILTERS:
        if f"filtered_{share}" in d.files:  # else data of an older run
            out["filtered_p50_ms"][share], out["filtered_recall_at_10"][share] = filtered(share)
    out["filtered_p99_ms"] = worst
    if hasattr(index, "wait_for_own_lists"):  # how long the copy of the 10% filter's codes takes
        from lookalike.index.filtered import Subset

        index.wait_for_own_lists()
        rows = index.rows.rows_of(db.filters.allowed(FILTERS["10%"][0], db.live.version))
        t1 = time.perf_counter()
        Subset(index.index, np.sort(rows[rows >= 0]), threading.Lock())
        out["own_lists_10%_build_s"] = round(time.perf_counter() - t1, 3)
    if hasattr(index, "nprobe") and "filtered_10%" in d.files:  # the lists a filter's own lists probe
        from lookalike.index import compact

        default, out["own_lists_probes_sweep"] = compact.SUBSET_PROBES, []
        for compact.SUBSET_PROBES in (0.15, 0.2, 0.3, 0.45):
            for share in ("1%", "10%"):
                p50, recall = filtered(share)
                out["own_lists_probes_sweep"].append({"exponent": compact.SUBSET_PROBES, "filter": share,
                                                      "p50_ms": p50, "recall_at_10": recall})  # fmt: skip
        compact.SUBSET_PROBES = default
    after = rss()
    out["ram_bytes_per_image"] = round((after["RssAnon"] - before["RssAnon"]) / images)
    out["ram_file_backed_bytes_per_image"] = round((after["RssFile"] - before["RssFile"]) / images)
    out["peak_rss_bytes"] = after["VmHWM"]

    # delete: the top product of a query, gone from the very next search, the same index object
    top = db.search(queries[0], 1)[0]
    t1 = time.perf_counter()
    db.records.remove(products=[top.product_id])
    again = db.search(queries[0], 10)
    out["delete_visible_s"] = round(time.perf_counter() - t1, 4)
    out["delete_rebuilt_index"] = db.live.index() is not index
    assert top.product_id not in {h.product_id for h in again}

    # add 1,000 images (vectors given: embedding excluded), the first found by the next search
    t1 = time.perf_counter()
    db.records.add([ImageRecord(f"new{i // IMAGES_PER_PRODUCT}", f"new/{i}.jpg", f"{i:064x}", v,
                                metadata={"brand": "new"}) for i, v in enumerate(extra)])  # fmt: skip
    found = db.search(extra[0], 1)
    out["add_1000_s"] = round(time.perf_counter() - t1, 3)
    out["add_found"] = found[0].image.endswith("new/0.jpg")
    # each filter's first search after that write: its ids looked up again, its rows found, its own
    # lists (compact) brought up to date
    out["filtered_first_after_write_ms"] = {}
    for share, (where, _) in FILTERS.items():
        t1 = time.perf_counter()
        db.search(queries[1], 10, where=where)
        out["filtered_first_after_write_ms"][share] = round((time.perf_counter() - t1) * 1000, 1)
    out["during_write"] = searches_during_write(db, queries, extra)
    t1 = time.perf_counter()
    db.close()
    out["close_save_s"] = round(time.perf_counter() - t1, 2)
    return out


def searches_during_write(db: Storage, queries: np.ndarray, extra: np.ndarray) -> dict:
    """Searches in one thread while another adds 1,000 more images: how long a write holds them up."""
    stop, lat = threading.Event(), []

    def searching() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            db.search(queries[len(lat) % len(queries)], 10)
            lat.append((time.perf_counter() - t) * 1000)

    searcher = threading.Thread(target=searching)
    searcher.start()
    time.sleep(0.2)
    before = len(lat)
    t0 = time.perf_counter()
    db.records.add([ImageRecord(f"more{i // IMAGES_PER_PRODUCT}", f"more/{i}.jpg", f"{i + 10**6:064x}", -v)
            for i, v in enumerate(extra)])  # fmt: skip
    write_s = time.perf_counter() - t0
    during = len(lat) - before
    stop.set()
    searcher.join()
    lat = lat[before : before + during + 1]  # those that ran while the write did (and the one across its end)
    return {"write_s": round(write_s, 3), "searches": len(lat), "p50_ms": round(statistics.median(lat), 2),
            "max_ms": round(max(lat), 2)}  # fmt: skip


def disk(directory: Path, images: int) -> dict:
    sizes = {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    index = sum(v for k, v in sizes.items() if k.startswith(("compact", "index-", "lite.db", "milvus-")))
    return {"disk_bytes_per_image": round(sum(sizes.values()) / images),
            "index_disk_bytes_per_image": round(index / images)}  # fmt: skip


def run_store(name: str, args, base_dir: Path, truth: dict, copies: Copies, queries: np.ndarray, work: Path) -> dict:
    """A copy of the filled catalog, its index built by store `name`, measured in a fresh process."""
    options = STORES[name]
    directory = work / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for f in base_dir.iterdir():
        shutil.copy2(f, directory / f.name)
    t0 = time.perf_counter()
    db = Storage(directory, **options)
    built: dict = {}
    if name == "milvus-server":  # every vector upserted to the server in batches, flushed, then named
        db.live.migrate(args.milvus)
        built["insert_s"] = round(time.perf_counter() - t0, 1)
        built["index_built_s"] = wait_for_index(args.milvus, directory)
    elif name.startswith("milvus"):  # the same into Milvus Lite
        db.live.migrate(f"milvus://{directory.resolve()}/lite.db")
    else:
        db.live.flush()  # builds the index from SQLite and saves its snapshot
    build_s = time.perf_counter() - t0
    db.close()
    rng = np.random.default_rng(1)
    extra = copies.real[rng.integers(0, len(copies.real), 1000)] + 0.05 * rng.normal(size=(1000, queries.shape[1]))
    extra = (extra / np.linalg.norm(extra, axis=1, keepdims=True)).astype(np.float32)
    data = work / "measure.npz"
    np.savez(data, queries=queries, extra=extra, **truth)
    row = {"images": args.images, "build_s": round(build_s, 1), "insert_per_s": round(args.images / build_s),
           **built, **disk(directory, args.images)}  # fmt: skip
    child = subprocess.run([sys.executable, __file__, "--measure", str(directory), "--store", name,
                            "--data", str(data), "--images", str(args.images)],
                           capture_output=True, text=True, check=True)  # fmt: skip
    row.update(json.loads(child.stdout.strip().splitlines()[-1]))
    if not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    print(name, json.dumps(row), file=sys.stderr, flush=True)
    return row


def wait_for_index(spec: str, directory: Path, limit_s: float = 1800) -> float:
    """Seconds until the server has indexed every row of the catalog's collection (a server builds its
    IVF lists in the background after a flush; searches meanwhile scan the unindexed rows)."""
    from pymilvus import MilvusClient

    from lookalike.index.milvus import TOKEN_ENV, address

    uri, _ = address(spec)
    token = os.environ.get(TOKEN_ENV, "")
    client = MilvusClient(uri=uri, token=token) if token else MilvusClient(uri=uri)
    collection = json.loads(next(directory.glob("milvus-*.json")).read_text())["collection"]
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        info = client.describe_index(collection, client.list_indexes(collection)[0])
        if int(info.get("total_rows", 0)) and int(info.get("pending_index_rows", 1)) == 0 and \
                int(info.get("indexed_rows", 0)) >= int(info["total_rows"]):  # fmt: skip
            break
        time.sleep(2)
    client.close()
    return round(time.perf_counter() - t0, 1)


@contextlib.contextmanager
def milvus_server(work: Path):
    """The embedded standalone Milvus server (PyPI `milvus`), its data under `work`."""
    from milvus import MilvusServer

    server = MilvusServer()
    server.set_base_dir(str(work / "milvus-data"))  # not "milvus-server": that is the store's catalog
    server.start()
    try:
        yield f"milvus://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


def suite_check() -> dict:
    """R@1 (top image's label) on suites 1-4: the compact index (forced at any size) vs exact."""
    photos = Photos(PipelineConfig(), 2, default_cache())
    out = {}
    for key in ("1", "2", "3", "4"):
        s = suites()[key]
        rows = read_labels(s.labels, s.root, s.label)
        vectors, _ = photos.vectors([r["__path__"] for r in rows])
        ok = ~np.isnan(vectors).any(axis=1)
        qi = [i for i, r in enumerate(rows) if ok[i] and r[s.label] and (not s.query or parse_where(s.query)(r))]
        gi = [i for i, r in enumerate(rows) if ok[i] and (not s.gallery or parse_where(s.gallery)(r))]
        r1 = {}
        for name, options in (("exact", {"large_from": 10**9}), ("compact", {"large_from": 1})):
            with tempfile.TemporaryDirectory() as tmp:
                db = Storage(tmp, **options)
                db.records.add([ImageRecord(rows[i][s.label] or "-", f"g/{i}", "0" * 64, vectors[i]) for i in gi])
                right = 0
                for i in qi:
                    hits = [h for h in db.search(vectors[i], 2) if not h.image.endswith(f"/g/{i}")]
                    right += bool(hits) and hits[0].product_id == rows[i][s.label]
                r1[name] = right / len(qi)
                db.close()
        out[s.name] = {**{k: round(v, 4) for k, v in r1.items()}, "change": round(r1["compact"] - r1["exact"], 4)}
        print(s.name, out[s.name], file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--stores", default="compact", help="compact (the default store) and/or hnsw (before)")
    ap.add_argument("--real", type=int, default=6000, help="real catalog photos the copies are made from")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dir", type=Path, default=None, help="where the catalogs are written (default: a temp dir)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--milvus", help="the Milvus server of the milvus-server store (default: one started here)")
    ap.add_argument("--suites", action="store_true")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, STORES[args.store], args.data, args.images)))
        return
    out: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.suites:
        out["suites"] = suite_check()
    else:
        base, queries, shots = real_vectors(args.real, args.queries)
        copies = Copies(base, args.images)
        work = Path(args.dir or tempfile.mkdtemp(prefix="lookalike-scale-"))
        work.mkdir(parents=True, exist_ok=True)
        out["real_vectors"], out["queries"] = len(base), len(queries)
        print(f"writing {args.images:,} images to SQLite", file=sys.stderr, flush=True)
        base_dir = work / "filled"
        shutil.rmtree(base_dir, ignore_errors=True)
        out["sqlite_write_s"], truth = fill(base_dir, copies, queries, shots)
        out["sqlite_write_s"] = round(out["sqlite_write_s"], 1)
        with contextlib.ExitStack() as stack:
            if "milvus-server" in args.stores.split(",") and not args.milvus:
                args.milvus = stack.enter_context(milvus_server(work))
            out["stores"] = {name: run_store(name, args, base_dir, truth, copies, queries, work)
                             for name in args.stores.split(",")}  # fmt: skip
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    main()
