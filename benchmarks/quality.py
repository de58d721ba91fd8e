"""Retrieval quality: the four benchmark suites, for the default pipeline and an ablation of choices.

    python benchmarks/quality.py [--only NAME,NAME] [--write]

Each configuration is a set of `lookalike eval --config` options; embeddings are cached
(~/.cache/lookalike/eval.db), so a rerun only computes new configurations. `--write` puts the
tables into BENCHMARKS.md between the quality markers. Results also go to benchmarks/out/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lookalike.eval import evaluate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", ROOT.parent / "shared" / "datasets")).resolve()

# (name, labels, label column, query selection, gallery selection)
SUITES = [
    ("1. sneakers50 shopper→catalog", "sneakers50", "product", "scene=wild", "scene=catalog"),
    ("2. sneakers50 leave-one-out", "sneakers50", "product", None, None),
    ("3. mrstepup multi-view", "mrstepup_multiview", "product", "product!=", None),
    ("4. fashion footwear type", "fashion_product_footwear", "articleType", None, None),
]

BEFORE = {"crop.strategy": "union", "crop.margin": "0.05", "pooling": "avg", "flip": "false",
          "embed_size": "224", "whiten": "0"}  # fmt: skip
GEM288 = {**BEFORE, "pooling": "gem", "embed_size": "288"}
MULTILAYER = ROOT / "benchmarks" / "out" / "lite0_multilayer_288.onnx"
# name -> options; the first is the pipeline as it was before the evaluation work
CONFIGS: dict[str, dict[str, str]] = {
    "before: detector crop (union), avg pooling, 224 px": BEFORE,
    "whole image, no detection": {**BEFORE, "crop.strategy": "whole"},
    "non-white area crop, no detection": {**BEFORE, "crop.strategy": "nonwhite"},
    "best box only": {**BEFORE, "crop.strategy": "best"},
    "union, margin 0": {**BEFORE, "crop.margin": "0"},
    "union, margin 0.15": {**BEFORE, "crop.margin": "0.15"},
    "union, grey padding": {**BEFORE, "crop.pad_color": "124,116,104"},
    "GeM pooling (p=3)": {**BEFORE, "pooling": "gem"},
    "GeM pooling (p=4)": {**BEFORE, "pooling": "gem", "gem_p": "4"},
    "horizontal-flip averaging": {**BEFORE, "flip": "true"},
    "PCA whitening 512-d, full (power 1)": {**BEFORE, "whiten": "512", "whiten_power": "1"},
    "PCA whitening 512-d, shrunk (power 0.5)": {**BEFORE, "whiten": "512", "whiten_power": "0.5"},
    "query expansion (alpha-QE, n=2)": {**BEFORE, "qe": "2"},
    "GeM + flip": {**BEFORE, "pooling": "gem", "flip": "true"},
    "GeM + flip + whitening 512-d (power 0.5)": {**BEFORE, "pooling": "gem", "flip": "true", "whiten": "512"},
    "GeM, input 256 px": {**BEFORE, "pooling": "gem", "embed_size": "256"},
    "GeM, input 288 px": GEM288,
    "GeM, input 320 px": {**BEFORE, "pooling": "gem", "embed_size": "320"},
    "GeM 288 px + multi-layer (block 14 + head)": {**GEM288, "embedder": str(MULTILAYER)},
    "GeM 288 px + whitening 512-d (power 0.5)": {**GEM288, "whiten": "512"},
    "GeM 288 px + whitening 1024-d (power 0.5)": {**GEM288, "whiten": "1024"},
}


def run(options: dict[str, str]) -> list[dict]:
    rows = []
    for name, dataset, label, query, gallery in SUITES:
        result = evaluate(DATASETS / dataset / "labels.csv", DATASETS / dataset, label, query, gallery, options)
        rows.append({"suite": name, **result.metrics, "failed": len(result.failed)})
    return rows


def suite_table(rows: list[dict]) -> str:
    out = ["| suite | queries | gallery | R@1 | R@5 | R@10 | mAP@10 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['suite']} | {r['queries']} | {r['gallery']} | {r['recall@1']:.3f} | {r['recall@5']:.3f} "
            f"| {r['recall@10']:.3f} | {r['mAP@10']:.3f} |"
        )
    return "\n".join(out)


def ablation_table(results: dict[str, list[dict]]) -> str:
    out = [
        "| configuration | S1 R@1 | S1 R@10 | S2 R@1 | S3 R@1 | S4 R@1 | mean R@1 | mean mAP@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        r1 = [r["recall@1"] for r in rows]
        maps = [r["mAP@10"] for r in rows]
        out.append(
            f"| {name} | {r1[0]:.3f} | {rows[0]['recall@10']:.3f} | {r1[1]:.3f} | {r1[2]:.3f} | {r1[3]:.3f} "
            f"| {sum(r1) / 4:.3f} | {sum(maps) / 4:.3f} |"
        )
    return "\n".join(out)


def default_options() -> dict[str, str]:
    """The shipped default pipeline (no options: PipelineConfig's defaults)."""
    return {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated configuration names (prefixes) to run")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    configs = {"default (shipped)": default_options(), **CONFIGS}
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        configs = {n: o for n, o in configs.items() if any(n.startswith(w) for w in wanted)}
    if any(o.get("embedder") == str(MULTILAYER) for o in configs.values()) and not MULTILAYER.exists():
        from multilayer import build

        MULTILAYER.parent.mkdir(exist_ok=True)
        build(str(MULTILAYER))
    results = {}
    for name, options in configs.items():
        t0 = time.perf_counter()
        results[name] = run(options)
        r = results[name]
        print(f"{name}: " + ", ".join(f"S{i + 1} R@1 {x['recall@1']:.3f}" for i, x in enumerate(r))
              + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "quality.json").write_text(json.dumps(results, indent=2))
    text = ""
    if "default (shipped)" in results:
        text += "### The suites, default pipeline\n\n" + suite_table(results["default (shipped)"]) + "\n\n"
    text += "### Ablation (R@k: a query hits when an image with its label is in the top k)\n\n"
    text += ablation_table({n: r for n, r in results.items() if n != "default (shipped)"}) + "\n"
    print(text)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        doc = path.read_text()
        start, end = "<!-- quality:start -->", "<!-- quality:end -->"
        if start in doc:
            doc = doc[: doc.index(start) + len(start)] + "\n" + text + doc[doc.index(end) :]
        else:
            doc += f"\n{start}\n{text}{end}\n"
        path.write_text(doc)


if __name__ == "__main__":
    main()
