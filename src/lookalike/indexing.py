"""Indexing a source: its items -> photos -> records (detect, crop, embed) -> the store, a batch at a
time, keeping the catalog in line with the source: unchanged photos (same bytes) are skipped, photos
the source no longer lists are pruned, products other sources or the API added are never touched."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from lookalike.encoder import BATCH, Encoder, Progress, StageProgress, run_parallel, safely, stage
from lookalike.fetch_state import FetchState
from lookalike.fetching import Fetcher, in_order, prefetch
from lookalike.images import Photo, describe, is_url, sha256_bytes
from lookalike.prepare import absolute, prepare
from lookalike.records import ImageRecord, Records
from lookalike.results import IndexReport
from lookalike.sources import Columns, Item, SourceProblem, iter_source, source_id
from lookalike.uploads import Uploads

if TYPE_CHECKING:
    from lookalike.cluster import RayRunner

Key = tuple[str, str]  # (product id, image)
FETCH_WINDOW = 64  # photos fetched ahead of the model workers' batch


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
    bar = stage(progress, "indexing")
    state = FetchState(records.directory)
    fetcher = Fetcher(encoder.limits)
    fresh: list[tuple] = []  # (url, sha256, etag, last_modified) of this run's downloads
    if ray:
        batches = ray.map(encoder.config, encoder.limits, items, known, sid, not dry_run, bar)
    else:
        read = _reader(encoder, fetcher, state, items, known, fresh, stage(progress, "fetching"))
        window = FETCH_WINDOW + BATCH * threads  # images read ahead of the models: what bounds memory
        fetched = prefetch(items, read, fetcher.options.connections, window)  # as they arrive
        one = safely(lambda got: _prepare(encoder, got[1:], known, sid, not dry_run))
        batches = in_order([(got[0], (got[1], outcome)) for got, outcome in batch]  # stored in the source's order
                           for batch in run_parallel(one, fetched, threads, bar, total=len(items)))  # fmt: skip
    claimed: list[Key] = []
    try:
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
                # validators after the records; some are of photos still waiting in `in_order`, and none
                # vouches for an image not stored: `_reader` sends one only when its hash is the stored one
                done = len(fresh)  # fetch threads go on appending behind this point
                state.put(fresh[:done])
                del fresh[:done]
    finally:
        report.downloads = dict(fetcher.stats) if fetcher.stats["requests"] else {}
        fetcher.close()
        state.close()
    if prune:
        report.pruned = sorted(k for k, (_, owner) in known.items() if owner in (sid, None) and k not in seen)
        report.removed = len(report.pruned)
    return report, items, claimed


def _reader(encoder: Encoder, fetcher: Fetcher, state: FetchState, items: list[Item], known: dict,
            fresh: list[tuple], progress: Progress | None) -> Callable[[Item], Photo | None]:  # fmt: skip
    """What the fetch pool runs per item: a URL downloaded (asking "changed since?" when the catalog
    holds what its validators were given for: None when the server says not), a path read."""
    validators = state.get([it.image for it in items if is_url(it.image)])
    done = [0]
    lock = threading.Lock()

    def read(item: Item) -> Photo | None:
        try:
            if not is_url(item.image):
                return encoder.photo(item.image)
            had = validators.get(item.image)
            stored = known.get((item.product_id, item.image), (None,))[0]
            got = fetcher.get(item.image, had[1:] if had and had[0] == stored else None)
            if got.data is None:
                return None
            photo = Photo(describe(item.image), got.data, sha256_bytes(got.data))
            fresh.append((item.image, photo.sha256, got.etag, got.last_modified))
            return photo
        finally:
            with lock:
                done[0] += 1
                if progress:
                    progress(done[0], len(items))

    return read


def _prepare(encoder: Encoder, pair: tuple[Item, Future], known: dict, sid: str, embed: bool) -> ImageRecord | None:
    """The model workers' part: the fetched photo (its failure raised here, reported by `safely`)
    detected, cropped and embedded; None when it is unchanged."""
    item, future = pair
    photo = future.result()
    return None if photo is None else prepare(encoder, item, known, sid, embed=embed, photo=photo)


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
