"""`lookalike eval`: retrieval quality on labelled photos, to choose the pipeline by the numbers.

A labels CSV has one row per image (`file`, relative to --root) and label columns. Gallery images
are embedded with a pipeline configuration, each query image is ranked against the gallery (never
against itself), and a query hits at k when a gallery image with its label is in the top k.
Vectors are cached per image content and configuration in a SQLite file, so comparing
configurations only computes what changed; detections are cached per image and detector too.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lookalike.errors import LookalikeError
from lookalike.pipeline import Photos, PipelineConfig, StageProgress, default_cache, rank_products, store_similarity

KS = (1, 5, 10)
SHOWN = 5  # results kept per query for the report
WORST = 12  # failures whose crop box is looked up (the report's gallery)
# eval-only options, applied to the ranking (query expansion)
POST_OPTIONS = {"qe": 0, "qe_alpha": 3.0, "rank": "image"}
# rank: "image" scores each gallery image (a hit when an image of the label is in the top k); "best",
# "mean2", "mean3" rank labels (products) by their images' scores, as search ranks products


# -- selecting rows ---------------------------------------------------------------------------
def parse_where(text: str) -> Callable[[dict], bool]:
    """`col=value`, `col!=value`, `col=` (empty) or `col!=` (non-empty); several joined by `&`."""
    tests = []
    for part in text.split("&"):
        part = part.strip()
        if "!=" in part:
            col, value = part.split("!=", 1)
            tests.append((col.strip(), value.strip(), False))
        elif "=" in part:
            col, value = part.split("=", 1)
            tests.append((col.strip(), value.strip(), True))
        else:
            raise LookalikeError(f"selection {text!r}: expected COLUMN=VALUE or COLUMN!=VALUE")
    return lambda row: all((row.get(c, "") == v) == eq for c, v, eq in tests)


def read_labels(path: Path, root: Path, label: str, image_column: str = "file") -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise LookalikeError(f"{path}: cannot read labels ({e.strerror})") from None
    if not rows:
        raise LookalikeError(f"{path}: no rows")
    for col in (image_column, label):
        if col not in rows[0]:
            raise LookalikeError(f"{path}: no column {col!r} (columns: {', '.join(rows[0])})")
    for r in rows:
        r["__path__"] = str(root / r[image_column])
    return rows


# -- metrics ----------------------------------------------------------------------------------
def retrieval_metrics(sim: np.ndarray, q_labels: list[str], g_labels: list[str], ks=KS, map_k: int = 10) -> dict:
    """Recall@k and mAP@k from a [queries, gallery] similarity matrix (use -inf to exclude a pair).

    A query with no relevant gallery item is left out of the averages (and counted)."""
    g = np.asarray(g_labels, dtype=object)
    q = np.asarray(q_labels, dtype=object)
    depth = min(max(max(ks), map_k), sim.shape[1])
    top = (
        np.argpartition(-sim, depth - 1, axis=1)[:, :depth]
        if depth < sim.shape[1]
        else np.tile(np.arange(sim.shape[1]), (sim.shape[0], 1))
    )
    order = np.take_along_axis(sim, top, axis=1).argsort(axis=1)[:, ::-1]
    ranked = np.take_along_axis(top, order, axis=1)
    valid = np.isfinite(np.take_along_axis(sim, ranked, axis=1))
    rel = (g[ranked] == q[:, None]) & valid
    # relevant = same label and comparable (an excluded pair, like the query itself, is -inf)
    relevant_total = ((g[None, :] == q[:, None]) & np.isfinite(sim)).sum(axis=1)
    ok = relevant_total > 0
    out = {"queries": int(ok.sum()), "queries_without_relevant": int((~ok).sum())}
    for k in ks:
        out[f"recall@{k}"] = float(rel[ok, :k].any(axis=1).mean()) if ok.any() else 0.0
    hits = rel[:, :map_k]
    precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    ap = (precision * hits).sum(axis=1) / np.minimum(relevant_total, map_k).clip(min=1)
    out[f"mAP@{map_k}"] = float(ap[ok].mean()) if ok.any() else 0.0
    return out


# -- post-processing ---------------------------------------------------------------------------
def query_expansion(qv: np.ndarray, gv: np.ndarray, sim: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """alpha-QE (Radenović et al.): add the top-n gallery vectors, weighted by similarity^alpha."""
    top = np.argsort(-sim, axis=1)[:, :n]
    w = np.clip(np.take_along_axis(sim, top, axis=1), 0, None) ** alpha
    expanded = qv + np.einsum("qn,qnd->qd", w, gv[top])
    return expanded / np.maximum(np.linalg.norm(expanded, axis=1, keepdims=True), 1e-12)


# -- the evaluation ---------------------------------------------------------------------------
@dataclass
class Outcome:
    """One query as the report shows it: its photo and label, the rank of the first right result
    (None: no right item in the gallery), the top results as (label, image, score), the right label's
    best gallery image as (image, score), and the box searched (filled for the worst failures)."""

    image: str
    label: str
    rank: int | None
    results: list[tuple[str, str, float]]
    right: tuple[str, float] | None
    box: tuple[float, float, float, float] | None = None


@dataclass
class EvalResult:
    metrics: dict
    config: dict
    failed: list[tuple[str, str]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)  # with details=True, worst first

    def recall_curve(self, depth: int = 50) -> list[float]:
        """Recall@k for k = 1..depth, over the queries with a right item in the gallery."""
        ranks = np.array([o.rank for o in self.outcomes if o.rank is not None])
        return [float((ranks <= k).mean()) if len(ranks) else 0.0 for k in range(1, depth + 1)]

    def by_label(self) -> list[dict]:
        """Per label (product): queries, R@1, R@10 and the median rank of the right one; hardest first."""
        groups: dict[str, list[int]] = {}
        for o in self.outcomes:
            if o.rank is not None:
                groups.setdefault(o.label, []).append(o.rank)
        out = [{"label": label, "queries": len(r), "recall@1": float(np.mean(np.array(r) <= 1)),
                "recall@10": float(np.mean(np.array(r) <= 10)), "median_rank": float(np.median(r))}
               for label, r in groups.items()]  # fmt: skip
        return sorted(out, key=lambda d: (d["recall@1"], d["recall@10"], -d["median_rank"], d["label"]))

    def to_dict(self) -> dict:
        return {**self.metrics, "config": self.config, "failed": [{"image": p, "reason": r} for p, r in self.failed]}


def split_options(options: dict[str, str]) -> tuple[dict[str, str], dict[str, float]]:
    post = {k: type(POST_OPTIONS[k])(v) for k, v in options.items() if k in POST_OPTIONS}
    return {k: v for k, v in options.items() if k not in POST_OPTIONS}, {**POST_OPTIONS, **post}


def evaluate(labels: Path, root: Path, label: str, query: str | None = None, gallery: str | None = None,
             options: dict[str, str] | None = None, threads: int = 2, cache_path: Path | None = None,
             progress: StageProgress | None = None, image_column: str = "file",
             store: str | None = None, details: bool = False,
             never_query: str | None = None) -> EvalResult:  # fmt: skip
    """Index the gallery rows, search with the query rows, measure. With neither selection: leave-one-out.
    `store` (e.g. milvus:///tmp/eval.db): search through that store, as a catalog on it serves, rather
    than scoring every pair exactly. `details`: also each query's outcome (for `--report`)."""
    rows = read_labels(labels, root, label, image_column)
    pipeline_options, post = split_options(options or {})
    config = PipelineConfig().with_options(pipeline_options)
    photos = Photos(config, threads, cache_path or default_cache())
    vectors, failed = photos.vectors([r["__path__"] for r in rows], progress)
    ok = ~np.isnan(vectors).any(axis=1)
    in_query = np.array([parse_where(query)(r) if query else True for r in rows]) & ok
    in_gallery = np.array([parse_where(gallery)(r) if gallery else True for r in rows]) & ok
    in_query &= np.array([r[label] != "" for r in rows])  # an unlabelled image cannot be scored
    if never_query:  # rows a model learned from as feedback: never searched with
        in_query &= ~np.array([parse_where(never_query)(r) for r in rows])
    qi, gi = np.nonzero(in_query)[0], np.nonzero(in_gallery)[0]
    if len(qi) == 0 or len(gi) == 0:
        raise LookalikeError(f"no {'query' if len(qi) == 0 else 'gallery'} images selected")
    qv, gv = vectors[qi], vectors[gi]
    whitening = photos.learn_projection(gv)  # learned on the gallery, as a catalog learns it on itself
    if whitening is not None:
        qv, gv = whitening(qv), whitening(gv)
    if store is not None:
        if post["qe"]:
            raise LookalikeError("qe (query expansion) is measured on exact scores: leave out --store")
        self_row = {int(g): n for n, g in enumerate(gi)}
        sim = store_similarity(store, gv, qv, np.array([self_row.get(int(q), -1) for q in qi]))
    else:
        sim = qv @ gv.T
        sim[qi[:, None] == gi[None, :]] = -np.inf  # never match an image with itself
    if post["qe"]:
        qv = query_expansion(qv, gv, sim, int(post["qe"]), float(post["qe_alpha"]))
        sim = qv @ gv.T
        sim[qi[:, None] == gi[None, :]] = -np.inf
    q_labels, g_labels = [rows[i][label] for i in qi], [rows[i][label] for i in gi]
    image_sim, image_labels = sim, g_labels
    if post["rank"] != "image":
        sim, g_labels = rank_products(sim, g_labels, str(post["rank"]))
    metrics = retrieval_metrics(sim, q_labels, g_labels)
    metrics["gallery"] = int(len(gi))
    result = EvalResult(metrics, {**json.loads(config.to_json()), **post}, failed)
    if details:
        paths = [rows[i]["__path__"] for i in gi]
        result.outcomes = outcomes([rows[i]["__path__"] for i in qi], q_labels, sim, g_labels, image_sim,
                                   image_labels, paths)  # fmt: skip
        for o in [o for o in result.outcomes if o.rank not in (None, 1)][:WORST]:
            try:
                box = photos.crop_box(o.image)
            except LookalikeError:
                continue
            o.box = None if box is None else (box.x1, box.y1, box.x2, box.y2)
    return result


def outcomes(queries: list[str], q_labels: list[str], sim: np.ndarray, labels: list[str], image_sim: np.ndarray,
             image_labels: list[str], images: list[str]) -> list[Outcome]:  # fmt: skip
    """Each query's outcome, worst first: the right one ranked lowest first, and at equal ranks the more
    confident wrong answer; queries with no right item in the gallery last. `sim`/`labels` are what is
    ranked (images, or products), `image_sim`/`image_labels` the images, for a product's best image."""
    per_image = sim is image_sim
    labels_a, image_labels_a = np.asarray(labels, dtype=object), np.asarray(image_labels, dtype=object)
    best_image = {}  # label -> its gallery images' indices
    for n, lab in enumerate(image_labels):
        best_image.setdefault(lab, []).append(n)
    out = []
    for i, (path, lab) in enumerate(zip(queries, q_labels, strict=True)):
        row, image_row = sim[i], image_sim[i]
        right = (labels_a == lab) & np.isfinite(row)
        rank = int((row > row[right].max()).sum()) + 1 if right.any() else None
        top = np.argsort(-row, kind="stable")[:SHOWN]
        shown = []
        for j in top:
            if not np.isfinite(row[j]):
                break
            imgs = [j] if per_image else best_image[labels[j]]
            shown.append((labels[j], images[imgs[int(np.argmax(image_row[imgs]))]], float(row[j])))
        mine = np.nonzero((image_labels_a == lab) & np.isfinite(image_row))[0]
        best = (images[mine[np.argmax(image_row[mine])]], float(image_row[mine].max())) if len(mine) else None
        out.append(Outcome(path, lab, rank, shown, best))
    worst = lambda o: (o.rank is None, -(o.rank or 0), -(o.results[0][2] if o.results else 0.0))  # noqa: E731
    return sorted(out, key=worst)


def tune_on_rows(labels: Path, root: Path, label: str, rows_selection: str | None, tune_options: dict[str, str],
                 options: dict[str, str] | None = None, threads: int = 2, progress: StageProgress | None = None,
                 image_column: str = "file", cache_path: Path | None = None,
                 feedback: str | None = None) -> tuple[Path, dict]:  # fmt: skip
    """Tune an embedder on the selected rows only (what a shop's catalog would hold), with `label` as
    the product id, plus the `feedback` rows as shoppers' labelled photos (what a shop's feedback would
    hold). The model is cached under the eval cache's folder, keyed by the rows' image contents,
    labels and all options, so comparing configurations tunes once."""
    everything = [r for r in read_labels(labels, root, label, image_column) if r[label] != ""]
    rows = [r for r in everything if parse_where(rows_selection)(r)] if rows_selection else everything
    shoppers = [r for r in everything if parse_where(feedback)(r)] if feedback else []
    if feedback and not shoppers:
        raise LookalikeError(f"--feedback {feedback!r}: no rows selected")
    photos = Photos(PipelineConfig().with_options(split_options(options or {})[0]), threads)
    folder = (cache_path or default_cache()).parent / "tuned"
    both = rows + shoppers
    return photos.tune(
        [r["__path__"] for r in both],
        [r[label] for r in both],
        tune_options,
        folder,
        progress,
        [False] * len(rows) + [True] * len(shoppers),
    )


def format_table(result: EvalResult) -> str:
    m = result.metrics
    keys = [f"recall@{k}" for k in KS] + ["mAP@10"]
    lines = ["| queries | gallery | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    lines.append(f"| {m['queries']} | {m['gallery']} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)
