"""Indexing a source: its items -> photos -> records (detect, crop, embed) -> the store, a batch at a
time, keeping the catalog in line with the source: unchanged photos (same bytes) are skipped, photos
the source no longer lists are pruned, products other sources or the API added are never touched."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from lookalike.encoder import Encoder, StageProgress, run_parallel, safely, stage
from lookalike.prepare import absolute, prepare
from lookalike.records import ImageRecord, Records
from lookalike.results import IndexReport
from lookalike.sources import Columns, Item, SourceProblem, iter_source, source_id
from lookalike.uploads import Uploads

if TYPE_CHECKING:
    from lookalike.cluster import RayRunner

Key = tuple[str, str]  # (product id, image)


def embed_source(records: Records, encoder: Encoder, source: str | Path | Iterable[Item], threads: int,
                 progress: StageProgress | None, prune: bool, dry_run: bool, source_name: str | None,
                 ray: RayRunner | None = None, columns: Columns | None = None,
                 ) -> tuple[IndexReport, list[Item], list[Key]]:  # fmt: skip
    """Embed and store the source's new or changed photos (nothing is written in a dry run), on this
    machine's threads or on Ray's actors. Returns the report (with the images to prune), the items
    listed, and the unchanged images this source now claims."""
    sid = source_id(source) if isinstance(source, str | Path) else (source_name or "python")
    report = IndexReport(source=sid, dry_run=dry_run)
    items: list[Item] = []
    for entry in iter_source(source, columns) if isinstance(source, str | Path) else source:
        if isinstance(entry, SourceProblem):
            (report.warnings if entry.warning else report.failed).append((entry.where, entry.reason))
        else:
            items.append(Item(entry.product_id, absolute(entry.image), entry.metadata))
    known = records.known()
    seen = {(it.product_id, it.image) for it in items}
    one = safely(lambda item: prepare(encoder, item, known, sid, embed=not dry_run))
    bar = stage(progress, "indexing")
    batches = (ray.map(encoder.config, encoder.limits, items, known, sid, not dry_run, bar) if ray
               else run_parallel(one, items, threads, bar))  # fmt: skip
    claimed: list[Key] = []
    for batch in batches:
        pending: list[ImageRecord] = []
        for item, outcome in batch:
            key = (item.product_id, item.image)
            if isinstance(outcome, ImageRecord):
                pending.append(outcome)
                report.updated += key in known
                report.added += key not in known
                report.crops[outcome.crop] = report.crops.get(outcome.crop, 0) + 1
            elif outcome is None:
                report.unchanged += 1
                if known[key][1] != sid:
                    claimed.append(key)
            else:
                report.failed.append((item.image, outcome))
        if not dry_run:
            records.add([r for r in pending if r.vector is not None])
    if prune:
        report.pruned = sorted(k for k, (_, owner) in known.items() if owner in (sid, None) and k not in seen)
        report.removed = len(report.pruned)
    return report, items, claimed


def settle(records: Records, report: IndexReport, items: list[Item], claimed: list[Key], uploads: Uploads) -> None:
    """After the photos are stored: claim the unchanged ones, bring product metadata up to date, drop
    what the source no longer lists (and uploads no product holds any more)."""
    if claimed:
        records.claim(claimed, report.source)
    wanted: dict[str, dict] = {}
    for it in items:
        wanted.setdefault(it.product_id, it.metadata)
    stored = records.products(list(wanted))
    changed = {p: m for p, m in wanted.items() if p in stored and stored[p] != m}
    if changed:
        records.set_products(changed)
    if report.pruned:
        uploads.forget(records.remove(images=report.pruned))
