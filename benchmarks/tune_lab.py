"""The tuning ablation, fast: views and trunk maps computed once, each recipe trained and scored in one go.

    python benchmarks/tune_lab.py --name NAME [--suite 1|5] [--option KEY=VALUE ...] [--json OUT]
    python benchmarks/tune_lab.py --table out/lab/r-*.json      # the ablation table, from earlier runs

`benchmarks/tune.py` measures the shipped path end to end (crops, views, training, ONNX export,
re-embedding through ONNX Runtime); comparing recipes that way costs ~15 min each on 2 cores. Here the
pipeline's crops of every sneakers50 photo and the frozen trunk's maps of the training views and of
the evaluation crops are cached under benchmarks/out/lab/ (keyed by what they depend on), so a recipe
costs its training only, and the tuned tail is scored in torch on the cached evaluation maps: the same
network as the exported ONNX model (trunk maps kept in float16: scores agree with the ONNX path to
about 1e-3). Training rows are catalog shots only (suite 1: all 50 products; suite 5: the first 25),
queries are never seen. Prints R@1/R@10 at product level (best image, as search ranks) for several
weights of the untuned vector, and writes them with the options and times to --json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from PIL import Image
from suites import OUT, suites

from lookalike.eval import read_labels, retrieval_metrics
from lookalike.pipeline import Photos, PipelineConfig
from lookalike.ranking import rank_labels
from lookalike.tune import _export, _modules, _torch, options_from_text, train, trunk_views

LAB = OUT / "lab"
WEIGHTS = (0.0, 0.25, 0.5, 0.6, 0.75)


def crops(rows: list[dict], size: int) -> np.ndarray:
    """[N, size, size, 3] uint8: the pipeline's crop of each row, resized as the embedder resizes it."""
    path = LAB / f"crops-{len(rows)}-{size}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    images, kept, failed = Photos(PipelineConfig()).crops([r["__path__"] for r in rows])
    assert not failed and len(kept) == len(rows), failed
    out = np.zeros((len(rows), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))
    LAB.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def cached(name: str, make) -> np.ndarray:
    path = LAB / f"{name}.npy"
    if not path.exists():
        np.save(path, make())
    return np.load(path, mmap_mode="r")


def vectors(tail, projection, maps: np.ndarray, torch, batch: int = 256) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, len(maps), batch):
            f = tail(torch.from_numpy(np.asarray(maps[s : s + batch], dtype=np.float32)))
            if projection is not None:
                f = projection(f)
            out.append(torch.nn.functional.normalize(f, dim=1).numpy())
    return np.concatenate(out)


def score(t: np.ndarray, o: np.ndarray, q, g, labels, weight: float) -> dict:
    v = np.concatenate([np.sqrt(1 - weight) * t, np.sqrt(weight) * o], axis=1) if weight < 1 else o
    sim = v[q] @ v[g].T
    ql, gl = [labels[i] for i in q], [labels[i] for i in g]
    out = {}
    for rank in ("best", "mean2", "mean3"):
        s, names = rank_labels(sim, gl, rank)
        m = retrieval_metrics(s, ql, names)
        prefix = "" if rank == "best" else f"{rank} "
        out.update({f"{prefix}R@1": round(m["recall@1"], 4), f"{prefix}R@10": round(m["recall@10"], 4)})
        if rank == "best":
            out["mAP@10"] = round(m["mAP@10"], 4)
    img = retrieval_metrics(sim, ql, gl)
    return {**out, "image R@1": round(img["recall@1"], 4), "image R@10": round(img["recall@10"], 4)}


def table(paths: list[str]) -> str:
    """Markdown rows: each run's options (as changed from the defaults), time, R@1/R@10 per weight."""
    default = asdict(options_from_text({}))
    before = {"pairs": 0.0, "legs": 0.0, "train_size": 0, "subcenters": 1}  # runs older than these
    lines = ["| run | suite | changed from the defaults | training | R@1 / R@10 at original_weight "
             "0 / 0.25 / 0.5 / 0.75 |", "|---|---|---|---|---|"]  # fmt: skip
    for path in paths:
        run = json.loads(Path(path).read_text())
        used = {**default, **before, **run["options"]}
        changed = ", ".join(f"{k}={used[k]}" for k in default if used[k] != default[k] and k != "backgrounds")
        cells = " · ".join(f"{run['results'][w]['R@1']:.3f} / {run['results'][w]['R@10']:.3f}"
                           for w in ("0.0", "0.25", "0.5", "0.75"))  # fmt: skip
        lines.append(f"| {run['name']} | {run['suite']} | {changed or '(defaults)'} | {run['train_s'] / 60:.1f} min"
                     f" | {cells} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", nargs="+", metavar="JSON")
    ap.add_argument("--name")
    ap.add_argument("--suite", choices=["1", "5"], default="1")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if not args.name:
        ap.error("--name is required for a run (it names the vectors file and the JSON)")
    torch = _torch()
    torch.set_num_threads(2)
    opts = options_from_text(dict(o.split("=", 1) for o in args.option))
    s5 = suites()["5"]
    rows = read_labels(s5.labels, s5.root, "product")  # all sneakers50 rows, with the `half` column
    labels = [r["product"] for r in rows]
    img = crops(rows, opts.size)
    catalog = np.array([r["scene"] == "catalog" for r in rows])
    wild = ~catalog
    train_rows = catalog & (np.array([r["half"] == "1" for r in rows]) if args.suite == "5" else True)
    test = np.array([r["half"] == "2" for r in rows]) if args.suite == "5" else np.ones(len(rows), bool)
    q, g = np.nonzero(wild & test)[0], np.nonzero(catalog & test)[0]

    trunk, original, tuned = _modules(opts.tail_from)

    def trunk_at(size: int) -> Path:
        path = LAB / f"trunk-{opts.tail_from}-{size}.onnx"
        if not path.exists():
            _export(trunk, torch.zeros(1, 3, size, size), path, "maps", dynamic_size=False)
        return path

    trunk_path = trunk_at(opts.size)
    view_keys = ("views", "tail_from", "size", "train_size", "seed", "backgrounds", "pairs", "legs")
    view_key = {k: getattr(opts, k) for k in view_keys if getattr(opts, k)}
    view_key["mask"] = 2  # the flood-filled shoe mask (1: thresholded and dilated, with a white rim)
    key = hashlib.sha256(json.dumps([view_key, len(rows)]).encode()).hexdigest()[:12]
    t0 = time.perf_counter()
    catalog_idx = np.nonzero(catalog)[0]
    # views of all 50 products' catalog shots (suite 5 trains on its half's slice of them)
    train_maps = cached(f"views-{key}", lambda: trunk_views(
        [Image.fromarray(np.asarray(img[i])) for i in catalog_idx], opts, trunk_at(opts.view_size),
        None, 2))  # fmt: skip
    t_views = time.perf_counter() - t0
    eval_key = hashlib.sha256(json.dumps([opts.tail_from, opts.size, len(rows)]).encode()).hexdigest()[:12]
    eval_maps = cached(
        f"eval-{eval_key}",
        lambda: trunk_views(
            [Image.fromarray(np.asarray(i)) for i in img], replace(opts, views=1, train_size=0), trunk_path, None, 2
        ),
    )

    keep = np.repeat(train_rows[catalog_idx], opts.views)
    names = sorted({labels[i] for i in np.nonzero(train_rows)[0]})
    y = np.repeat([names.index(labels[i]) for i in catalog_idx if train_rows[i]], opts.views).astype(np.int64)
    maps = np.asarray(train_maps[keep]) if not keep.all() else train_maps
    t1 = time.perf_counter()

    def report(stage: str, done: int, total: int | None) -> None:
        if done % 50 == 0 or done == total:
            print(f"{stage} {done}/{total} {time.perf_counter() - t1:.0f} s", flush=True)

    projection, loss, acc = train(maps, y, tuned, opts, report)
    t_train = time.perf_counter() - t1
    t = vectors(tuned, projection, eval_maps, torch)
    o = vectors(original, None, eval_maps, torch)
    np.savez(LAB / f"vectors-{args.name}.npz", tuned=t, original=o)  # for looking at failures afterwards
    results = {str(w): score(t, o, q, g, labels, w) for w in WEIGHTS}
    results["untuned"] = score(t, o, q, g, labels, 1.0)
    out = {"name": args.name, "suite": args.suite, "options": asdict(opts), "train_s": round(t_train, 1),
           "views_s_if_computed": round(t_views, 1), "loss": loss, "train_accuracy": acc, "results": results,
           "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"}  # fmt: skip
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
