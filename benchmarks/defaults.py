"""Defaults chosen by the worst case over suites 1-5, not the mean.

    python benchmarks/defaults.py [--json OUT]

For each choice, R@1 on every suite with the choice and with the plain option, the change per suite and
the worst change. The rule: a default that costs any suite more than 1 point of R@1 against the plain
option is not a default. Vectors are cached by `lookalike eval`, so this costs little after one run.
Product-level ranking is measured on the suites whose label is the product (1, 2, 3, 5); suite 4 has
one photo per product, so there every product-level rule equals the image ranking.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from suites import suites

from lookalike.eval import evaluate

PLAIN = {"whiten": "0"}  # GeM 288 px, no whitening, image-level ranking
CHOICES = {
    "PCA whitening 1024-d (power 0.5), learned on the catalog": ({"whiten": "1024"}, "12345"),
    "PCA whitening 512-d (power 0.5)": ({"whiten": "512"}, "12345"),
    "product score: best image (search's ranking)": ({"rank": "best"}, "1235"),
    "product score: mean of best 2 images": ({"rank": "mean2"}, "1235"),
    "product score: mean of best 3 images": ({"rank": "mean3"}, "1235"),
}


def r1(suite, options: dict[str, str]) -> dict:
    m = evaluate(suite.labels, suite.root, suite.label, suite.query, suite.gallery, options).metrics
    return {k: m[k] for k in ("recall@1", "recall@10", "mAP@10", "queries", "gallery")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    all_suites = suites()
    plain = {key: r1(s, PLAIN) for key, s in all_suites.items()}
    print("plain: " + ", ".join(f"S{k} {v['recall@1']:.3f}" for k, v in plain.items()), file=sys.stderr)
    rows = []
    for name, (options, which) in CHOICES.items():
        got = {k: r1(all_suites[k], {**PLAIN, **options}) for k in which}
        base = plain
        if "rank" in options:  # against the best image, the product-level plain option
            base = {k: r1(all_suites[k], {**PLAIN, "rank": "best"}) for k in which}
        change = {k: got[k]["recall@1"] - base[k]["recall@1"] for k in which}
        worst = min(change.values())
        rows.append({"choice": name, "options": options, "results": got, "change": change, "worst": worst})
        print(f"{name}: worst {worst * 100:+.1f}", file=sys.stderr, flush=True)
    header = "| choice | " + " | ".join(f"S{k} R@1 (change)" for k in "12345") + " | worst | default? |"
    lines = [header, "|---" * 8 + "|", "| plain: GeM 288 px, no whitening | "
             + " | ".join(f"{plain[k]['recall@1']:.3f}" for k in "12345") + " | | |"]  # fmt: skip
    for row in rows:
        cells = [
            f"{row['results'][k]['recall@1']:.3f} ({row['change'][k] * 100:+.1f})" if k in row["change"] else "="
            for k in "12345"
        ]
        verdict = "yes" if row["worst"] >= -0.01 else "no"
        lines.append(f"| {row['choice']} | " + " | ".join(cells) + f" | {row['worst'] * 100:+.1f} | {verdict} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"plain": plain, "choices": rows}, indent=2))


if __name__ == "__main__":
    main()
