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
