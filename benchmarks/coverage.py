"""How spread out the true neighbours are (issue 13): for IVF partitions of N vectors, the share of
each query's exact top 10 that lies in the lists an IVF would probe, and how many vectors those lists
hold. It bounds what any IVF index can do: recall@10 cannot exceed the coverage of the lists it scans.

    bin/python benchmarks/coverage.py --images 1000000 --json benchmarks/out/coverage-1m.json  # ~8 min

The same vectors and queries as `scale.py` (real vectors and copies of them; shopper photos and
catalog photos as queries). The partition is FAISS's k-means on 100,000 of the vectors, each vector
in the list of its nearest centroid by inner product, as the compact index assigns them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import Copies, TopK, real_vectors  # noqa: E402
from speed import machine  # noqa: E402
from suites import emit  # noqa: E402

TRAIN = 100_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--lists", default="1024,4096")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    faiss.omp_set_num_threads(2)
    real, shopper, catalog = real_vectors(6000, 200)
    copies = Copies(real, args.images)
    vectors = np.empty((args.images, real.shape[1]), dtype=np.float16)  # 2.6 GB at a million
    truth = {"shopper": TopK(shopper, 10), "catalog": TopK(catalog, 10)}
    for start, v in copies.chunks():
        vectors[start : start + len(v)] = v
        for t in truth.values():
            t.update(v, np.arange(start, start + len(v)))
    train = vectors[np.sort(np.random.default_rng(0).permutation(args.images)[:TRAIN])].astype(np.float32)
    out = {"machine": machine(), "images": args.images, "rows": []}
    for nlist in (int(n) for n in args.lists.split(",")):
        t0 = time.perf_counter()
        kmeans = faiss.Kmeans(real.shape[1], nlist, niter=10, seed=1, max_points_per_centroid=TRAIN // nlist + 1)
        kmeans.train(train)
        centroids = kmeans.centroids
        lists = np.concatenate([(vectors[s : s + 100_000].astype(np.float32) @ centroids.T).argmax(1)
                                for s in range(0, args.images, 100_000)])  # fmt: skip
        sizes = np.bincount(lists, minlength=nlist)
        print(f"{nlist} lists: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for share in (1 / 32, 1 / 16, 1 / 8, 1 / 4):
            probed = int(nlist * share)
            row = {"nlist": nlist, "nprobe": probed}
            for name, queries in (("shopper", shopper), ("catalog", catalog)):
                order = np.argsort(-(queries @ centroids.T), axis=1)[:, :probed]
                ids = truth[name].ids
                row[f"coverage_{name}"] = round(float(np.mean([np.isin(lists[ids[i]], order[i]).mean()
                                                               for i in range(len(queries))])), 3)  # fmt: skip
                row[f"scanned_{name}"] = int(np.mean([sizes[order[i]].sum() for i in range(len(queries))]))
            out["rows"].append(row)
            print(row, file=sys.stderr, flush=True)
    emit(out, args.json)


if __name__ == "__main__":
    main()
