"""`lookalike eval --report out.html`: one self-contained page an operator can open anywhere: the
metrics, a Recall@k curve, the worst failures (the query with the box searched, the wrong results
ahead of the right product, the right product's best image) and the hardest labels.

Images are embedded as small JPEG data URIs and the plot as inline SVG, so the file can be mailed or
attached to an issue; the photos stay where they are otherwise."""

from __future__ import annotations

import html
import io
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.eval import KS, WORST, EvalResult
from lookalike.pipeline import thumbnail_uri

THUMB = 180  # pixels, the longer side of each picture
CSS = """
body {font-family: system-ui, sans-serif; margin: 2rem; color: #111}
table {border-collapse: collapse; margin: .5rem 0 1.5rem} td, th {border: 1px solid #ccc; padding: .25rem .6rem}
th {background: #f3f4f6} td.num {text-align: right; font-variant-numeric: tabular-nums}
.failure {display: flex; gap: .75rem; align-items: flex-start; border-top: 1px solid #ddd; padding: .75rem 0}
figure {margin: 0; width: 180px; font-size: .8rem} figure img {width: 180px; height: 180px; object-fit: contain;
  background: #fafafa; border: 1px solid #eee} .wrong figcaption {color: #b91c1c} .right figcaption {color: #15803d}
.query figcaption {font-weight: 600} .missing {width: 180px; height: 180px; background: #eee}
"""


def _picture(path: str, box: tuple[float, float, float, float] | None = None) -> str:
    """A photo (with the searched box drawn) as an embedded JPEG, or a grey square if unreadable."""
    src = thumbnail_uri(path, THUMB * 2, box)
    return f'<img src="{src}" alt="">' if src else '<div class="missing"></div>'


def recall_plot(curve: list[float]) -> str:
    """Recall@k for k = 1..len(curve) as inline SVG (matplotlib, the `report` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise LookalikeError("the report's plot needs matplotlib: pip install 'lookalike[report]'") from None
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    ks = list(range(1, len(curve) + 1))
    ax.plot(ks, curve, marker="o", markersize=3, color="#2563eb")
    for k in KS:
        if k <= len(curve):
            ax.annotate(f"{curve[k - 1]:.3f}", (k, curve[k - 1]), textcoords="offset points", xytext=(4, -12),
                        fontsize=8)  # fmt: skip
    ax.set_xscale("log")
    ticks = [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= len(curve)]
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("k (results looked at)")
    ax.set_ylabel("Recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Share of queries whose right product is in the top k")
    fig.tight_layout()
    out = io.StringIO()
    fig.savefig(out, format="svg")
    plt.close(fig)
    svg = out.getvalue()
    return svg[svg.index("<svg") :]  # inline: no XML prologue


def _failure(o) -> str:
    ahead = [r for r in o.results if r[0] != o.label][:3]
    cells = [f'<figure class="query">{_picture(o.image, o.box)}<figcaption>query · {html.escape(o.label)}<br>'
             f"{html.escape(Path(o.image).name)}</figcaption></figure>"]  # fmt: skip
    for n, (label, image, score) in enumerate(ahead, 1):
        cells.append(f'<figure class="wrong">{_picture(image)}<figcaption>#{n} {html.escape(label)}<br>'
                     f"score {score:.3f}</figcaption></figure>")  # fmt: skip
    if o.right is not None:
        image, score = o.right
        cells.append(f'<figure class="right">{_picture(image)}<figcaption>right: {html.escape(o.label)} at rank '
                     f"{o.rank}<br>best image, score {score:.3f}</figcaption></figure>")  # fmt: skip
    return f'<div class="failure">{"".join(cells)}</div>'


def write_report(result: EvalResult, path: Path, title: str = "lookalike eval") -> Path:
    """Write the page (an EvalResult from `evaluate(..., details=True)`); returns its path."""
    if not result.outcomes:
        raise LookalikeError("the report needs each query's outcome: evaluate(..., details=True)")
    m = result.metrics
    scores = [f"recall@{k}" for k in KS] + ["mAP@10"]
    metrics = "".join(f"<th>{html.escape(k)}</th>" for k in ("queries", "gallery", *scores))
    values = "".join(f'<td class="num">{m[k]}</td>' for k in ("queries", "gallery"))
    values += "".join(f'<td class="num">{m[k]:.3f}</td>' for k in scores)
    failures = [o for o in result.outcomes if o.rank is not None and o.rank > 1][:WORST]
    labels = "".join(
        f'<tr><td>{html.escape(d["label"])}</td><td class="num">{d["queries"]}</td>'
        f'<td class="num">{d["recall@1"]:.2f}</td><td class="num">{d["recall@10"]:.2f}</td>'
        f'<td class="num">{d["median_rank"]:g}</td></tr>'
        for d in result.by_label()
    )
    config = html.escape(", ".join(f"{k}={v}" for k, v in result.config.items() if not isinstance(v, dict)))
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Metrics</h2><table id="metrics"><tr>{metrics}</tr><tr>{values}</tr></table>
<p><small>{config}</small></p>
<h2>Recall@k</h2><div id="recall-plot">{recall_plot(result.recall_curve(min(50, max(m["gallery"], 1))))}</div>
<h2>Worst failures ({len(failures)} of {sum(1 for o in result.outcomes if o.rank not in (None, 1))} queries whose top
result is wrong)</h2>
<p>Each row: the query (green: the box searched), the wrong results ranked above the right product, and the right
product's best image with its rank.</p>
<div id="failures">{"".join(_failure(o) for o in failures) or "<p>None: every query's top result is right.</p>"}</div>
<h2>By label, hardest first</h2>
<table id="labels"><tr><th>label</th><th>queries</th><th>R@1</th><th>R@10</th><th>median rank</th></tr>{labels}</table>
</body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# -- `lookalike searches report`: what a shop learns from its shoppers' searches ------------------------
def write_searches_report(searches: list[dict], vectors: dict[str, object], path: Path, threshold: float,
                          title: str = "lookalike searches") -> Path:  # fmt: skip
    """Searches per day, the share answered "no close match", the most searched products, click-through
    by rank and the unanswered searches' photos, near-identical ones grouped (`vectors`: the photo's
    vector by search_id, for those). `searches`: the search log's entries (`SearchLog.searches`)."""
    from collections import Counter
    from datetime import UTC, datetime

    import numpy as np

    from lookalike.pipeline import near_groups

    days = Counter(datetime.fromtimestamp(s["at"], UTC).strftime("%Y-%m-%d") for s in searches)
    unanswered = [s for s in searches if s["no_match"] or not s["results"]]
    top = Counter(s["results"][0]["product_id"] for s in searches if s["results"] and not s["no_match"])
    shown_at: Counter = Counter()
    clicked_at: Counter = Counter()
    for s in searches:
        order = [r["product_id"] for r in s["results"]]
        for rank in range(1, len(order) + 1):
            shown_at[rank] += 1
        for f in s["feedback"]:
            if f["kind"] in ("click", "purchase") and f["product_id"] in order:
                clicked_at[order.index(f["product_id"]) + 1] += 1
    per_day = "".join(f'<tr><td>{d}</td><td class="num">{n}</td></tr>' for d, n in sorted(days.items()))
    products = "".join(f'<tr><td>{html.escape(p)}</td><td class="num">{n}</td></tr>' for p, n in top.most_common(20))
    ctr = "".join(f'<tr><td class="num">{r}</td><td class="num">{shown_at[r]}</td><td class="num">{clicked_at[r]}</td>'
                  f'<td class="num">{clicked_at[r] / shown_at[r]:.1%}</td></tr>' for r in sorted(shown_at))  # fmt: skip
    with_vectors = [s for s in unanswered if s["search_id"] in vectors]
    groups = near_groups(np.stack([vectors[s["search_id"]] for s in with_vectors]), threshold) if with_vectors else []
    groups.sort(key=len, reverse=True)
    gallery = "".join(
        f"<figure>{_picture(with_vectors[g[0]]['photo'], _box(with_vectors[g[0]]))}<figcaption>"
        f"{len(g)} search(es)<br>last {datetime.fromtimestamp(with_vectors[g[-1]]['at'], UTC):%Y-%m-%d}"
        f"</figcaption></figure>"
        for g in groups[:60]
    )
    share = len(unanswered) / len(searches) if searches else 0.0
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS} .gallery {{display: flex; flex-wrap: wrap; gap: .75rem}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p id="summary">{len(searches)} search(es) kept; <b>{share:.1%}</b> answered "no close match"
({len(unanswered)}); {sum(clicked_at.values())} click(s) or purchase(s) on a result.</p>
<h2>Searches per day</h2><table id="per-day"><tr><th>day (UTC)</th><th>searches</th></tr>{per_day}</table>
<h2>Most searched products (the top result)</h2>
<table id="products"><tr><th>product</th><th>searches</th></tr>{products}</table>
<h2>Click-through by rank</h2>
<table id="ctr"><tr><th>rank</th><th>shown</th><th>clicked</th><th>rate</th></tr>{ctr}</table>
<h2>Unanswered searches: what shoppers look for that the catalog does not have</h2>
<p>Each picture stands for a group of near-identical photos (the same shoe photographed alike), largest first.</p>
<div id="unanswered" class="gallery">{gallery or "<p>None.</p>"}</div>
</body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _box(search: dict) -> tuple[float, float, float, float] | None:
    return tuple(search["box"]) if search.get("box") else None
