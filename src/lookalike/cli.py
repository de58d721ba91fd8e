"""The `lookalike` command line. Calls the pipeline only."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from datetime import UTC
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.pipeline import (
    DEFAULT_RANK,
    DUPLICATE_SCORE,
    PULL_HINT,
    RANKS,
    BoxChoice,
    Catalog,
    Columns,
    Limits,
    PipelineConfig,
    check_models,
    pull_models,
)

EXIT_ERROR = 2  # nothing was done: the message says why
EXIT_SKIPPED = 3  # `index` finished, but some inputs were skipped (each one named on stderr)
PRUNE_SHOWN = 50


def _where(pairs: list[str]) -> dict[str, str] | None:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise LookalikeError(f"--where {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out or None


class Bars:
    """Progress bars with an ETA on stderr, one per stage of a long job: the one progress adapter. Stages
    that run side by side (fetching and indexing) each keep a bar, so their rates show apart; safe to call
    from several threads."""

    def __init__(self, quiet: bool = False, unit: str = "img"):
        self.quiet, self.unit, self.bars = quiet, unit, {}
        self._lock = threading.Lock()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        from tqdm import tqdm

        with self._lock:
            bar = self.bars.get(stage)
            if bar is None:
                bar = self.bars[stage] = tqdm(
                    total=total, desc=stage, unit="step" if stage == "training" else self.unit,
                    disable=self.quiet or None, file=sys.stderr, position=len(self.bars),
                )  # fmt: skip
            bar.total = total
            bar.update(done - bar.n)

    def close(self) -> None:
        with self._lock:
            for bar in self.bars.values():
                bar.close()
            self.bars = {}


def cmd_index(args: argparse.Namespace) -> int:
    options = dict(_where(args.config) or {})
    options.update({k: v for k, v in (("detector", args.detector), ("embedder", args.embedder)) if v})
    config = PipelineConfig().with_options(options) if options else None
    limits = Limits(allow_private_urls=args.allow_private_urls)
    with Catalog.open(args.catalog, config=config, create=True, threads=args.threads, store=args.store,
                      limits=limits) as cat:  # fmt: skip
        bars = Bars(args.quiet)
        columns = Columns(
            args.id_column,
            args.image_column,
            tuple(args.metadata_column) if args.metadata_column else None,
            args.format,
        )
        report = cat.index(args.source, progress=bars, prune=not args.keep_missing, dry_run=args.dry_run,
                           ray=args.ray, workers=args.workers, columns=columns)  # fmt: skip
        bars.close()
        for where, message in report.warnings:
            print(f"warning {where}: {message}", file=sys.stderr)
        for where, reason in report.failed:
            print(f"skipped {where}: {reason}", file=sys.stderr)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        elif args.dry_run:
            for product_id, image in report.pruned[:PRUNE_SHOWN]:
                print(f"would remove {product_id} {image}")
            if len(report.pruned) > PRUNE_SHOWN:
                print(f"... and {len(report.pruned) - PRUNE_SHOWN} more (--json lists them all)")
            print(
                f"dry run: would index {report.processed} image(s) ({report.added} new, {report.updated} changed), "
                f"{report.unchanged} unchanged; would remove {report.removed} image(s) this source no longer "
                f"lists; {len(report.failed)} would be skipped; nothing was written"
            )
        else:
            info = cat.info()
            print(
                f"indexed {report.processed} image(s) ({report.added} new, {report.updated} changed), "
                f"{report.unchanged} unchanged, {report.removed} removed, {len(report.failed)} skipped "
                f"in {report.seconds:.1f} s; catalog: {info['products']} products, {info['images']} images"
            )
            if d := report.downloads:
                print(f"downloads: {d['requests']} request(s), {d['bytes'] / 1e6:.1f} MB, {d['not_modified']} "
                      f"unchanged (not downloaded again), {d['retries']} tried again")  # fmt: skip
    return EXIT_SKIPPED if report.failed else 0


def cmd_search(args: argparse.Namespace) -> int:
    if (args.image is None) == (args.product is None):
        raise LookalikeError("search: give a photo (IMAGE) or --product ID, one of the two")
    if args.product is not None and args.collapse is not None:
        raise LookalikeError("search: --collapse applies to a photo search")
    if args.product is not None and args.min_score is not None:
        raise LookalikeError("search: --min-score applies to a photo search (more like a product has no threshold)")
    with Catalog.open(args.catalog, threads=args.threads) as cat:
        if args.product is not None:
            result = cat.similar(args.product, k=args.k, where=_where(args.where), rank=args.rank)
        else:
            result = cat.search(args.image, k=args.k, where=_where(args.where), box=BoxChoice.parse(args.box),
                                rank=args.rank, min_score=args.min_score, collapse=args.collapse)  # fmt: skip
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    q = result.query
    used = q.box_used
    where = f" box {used.x1:.0f},{used.y1:.0f},{used.x2:.0f},{used.y2:.0f}" if used else ""
    if result.no_match:
        print(f"no close match: nothing in this catalog scores {result.threshold:.3f} or more "
              f"(its threshold for unrelated photos) ({q.took_ms:.0f} ms)")  # fmt: skip
        if not result.results:
            if args.min_score is None:
                print("(--min-score 0 shows the closest products anyway)")
            return 0
        print(f"the closest anyway (score >= {args.min_score}):")
    if args.product is not None:
        print(f"more like {args.product} (its stored vectors, {q.took_ms:.0f} ms)")
    else:
        print(f"query: {len(q.boxes)} shoe box(es) detected; searched with the {q.crop} crop{where} "
              f"({q.took_ms:.0f} ms)")  # fmt: skip
    for rank, m in enumerate(result.results, 1):
        meta = " ".join(f"{k}={m.shown(k)}" for k in m.metadata)
        print(f"{rank:>3}  {m.score:.4f}  {m.product_id}  {m.image}  {meta}".rstrip())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with Catalog.open(args.catalog) as cat:
        info = cat.info()
        if args.duplicates:
            bars = Bars(args.json)
            info["duplicates"] = cat.duplicates(
                args.threshold, progress=lambda done, total: bars("checking", done, total)
            )
            bars.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key != "duplicates":
            print(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
    if args.duplicates:
        print(f"near-duplicate photos of different products (score >= {args.threshold}): {len(info['duplicates'])}")
        for d in info["duplicates"]:
            print(f"  {d['score']:.4f}  {d['products'][0]}  {d['products'][1]}  {d['images'][0]}  {d['images'][1]}")
    return 0


def cmd_store_migrate(args: argparse.Namespace) -> int:
    with Catalog.open(args.catalog, check_models=False) as cat:
        moved = cat.migrate(args.to)
    print(f"moved {moved['vectors']} vector(s) from {moved['from']} to {moved['to']} (index: {moved['index']})")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    with Catalog.open(args.catalog) as cat:
        n = cat.remove(args.product_ids)
        info = cat.info()
    print(f"removed {n} image(s); catalog: {info['products']} products, {info['images']} images")
    return 0 if n else 1


def cmd_app(args: argparse.Namespace) -> int:
    Catalog.open(args.catalog).close()  # a wrong path fails here, with one line
    _keep_searches(args.catalog, args.keep_searches, "app")
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise LookalikeError("the web app needs Streamlit: pip install 'lookalike[app]'") from None
    script = Path(__file__).with_name("app.py")
    argv = [
        sys.executable, "-m", "streamlit", "run", str(script),
        "--server.address", args.host, "--server.port", str(args.port), "--server.headless", "true",
        "--server.maxUploadSize", "25", "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
        "--", "--catalog", args.catalog,
    ]  # fmt: skip
    print(f"lookalike app: http://{args.host}:{args.port}", file=sys.stderr)
    os.execv(sys.executable, argv)
    return 0  # not reached


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from lookalike.api import ApiSettings, serve
    except ImportError:
        raise LookalikeError("the API needs FastAPI and uvicorn: pip install 'lookalike[api]'") from None
    settings = ApiSettings.from_env(
        args.token_file, protect_reads=args.protect_reads, threads=args.threads,
        max_upload_bytes=args.max_upload_mb * 1024 * 1024, url_timeout_s=args.url_timeout,
        max_url_fetches=args.max_url_fetches, allow_private_urls=args.allow_private_urls,
    )  # fmt: skip
    if settings.token is None:
        print("lookalike serve: no LOOKALIKE_API_TOKEN: write endpoints are off", file=sys.stderr)
    _keep_searches(args.catalog, args.keep_searches, "serve")
    serve(args.catalog, args.host, args.port, settings)
    return 0


def _keep_searches(catalog: str, days: int | None, face: str) -> None:
    """`serve`/`app --keep-searches DAYS`: the catalog's search log setting, said out loud at start."""
    with Catalog.open(catalog, check_models=False) as cat:
        if days is not None:
            cat.log.keep(days)
        kept = cat.log.keep_days()
    if kept:
        print(f"lookalike {face}: shoppers' searches are kept for {kept} days (personal data; "
              f"`lookalike searches purge --catalog {catalog} --all` deletes them)", file=sys.stderr)  # fmt: skip


def _when(text: str | None) -> float | None:
    """A --before date (YYYY-MM-DD, UTC) or date and time (ISO 8601) -> a timestamp."""
    if text is None:
        return None
    from datetime import datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise LookalikeError(f"--before {text!r}: expected a date, YYYY-MM-DD (or YYYY-MM-DDTHH:MM)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def cmd_searches(args: argparse.Namespace) -> int:
    from datetime import datetime

    stamp = lambda t: datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")  # noqa: E731
    with Catalog.open(args.catalog, check_models=False) as cat:
        if args.action == "keep":
            cat.log.keep(args.days)
            print(f"searches kept for {args.days} days" if args.days else "search log off: no new search is kept")
            return 0
        if args.action == "purge":
            if (args.before is None) == (not args.all):
                raise LookalikeError("purge needs --before DATE or --all")
            gone = cat.log.purge(None if args.all else _when(args.before))
            print(f"deleted {gone} search(es), their feedback and photos")
            return 0
        kept = cat.log.searches(_when(args.before))
        if args.action == "report":
            from lookalike.report import write_searches_report

            unanswered = [s for s in kept if s["no_match"] or not s["results"]]
            vectors = {}
            for s in unanswered:  # a photo that no longer loads is left out of the gallery, not fatal
                try:
                    vectors[s["search_id"]] = cat.embed(s["photo"])
                except LookalikeError:
                    continue
            path = write_searches_report(kept, vectors, Path(args.out), DUPLICATE_SCORE,
                                         f"lookalike searches · {Path(args.catalog).name}")  # fmt: skip
            print(f"report: {path} ({len(kept)} searches, {len(unanswered)} unanswered)")
            return 0
    if args.action == "list":
        for s in kept:
            top = s["results"][0]["product_id"] if s["results"] else "no match"
            clicked = ",".join(f"{f['kind']}:{f['product_id']}" for f in s["feedback"]) or "-"
            print(f"{s['search_id']}\t{stamp(s['at'])}\t{len(s['results'])} results\ttop {top}\t{clicked}")
        print(f"{len(kept)} search(es) kept", file=sys.stderr)
        return 0
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115
    for s in kept:
        out.write(json.dumps({**s, "at": stamp(s["at"])}) + "\n")
    if args.out:
        out.close()
        print(f"{len(kept)} search(es) written to {args.out}", file=sys.stderr)
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    with Catalog.open(args.catalog, check_models=False) as cat:
        if args.action == "import":
            bars = Bars(args.quiet, unit="photo")
            report = cat.import_feedback(args.file, Columns(args.product_column, args.photo_column),
                                         progress=lambda done, total: bars("import", done, total))  # fmt: skip
            bars.close()
            for where, reason in report.failed:
                print(f"skipped {where}: {reason}", file=sys.stderr)
            print(f"imported {report.imported} labelled photo(s), skipped {len(report.failed)}")
            return 0 if report.imported or not report.failed else 1
        if args.action == "remove":
            if not args.ids and not args.all:
                raise LookalikeError("remove needs feedback ids (see `feedback list`) or --all (every imported photo)")
            gone = cat.log.remove_feedback(None if args.all else args.ids)
            print(f"removed {gone} feedback photo(s)")
            return 0 if gone else 1
        photos = cat.log.feedback_photos(("click", "purchase", "not_this", "label"))
    for f in photos:
        box = ",".join(f"{v:g}" for v in f.box) if f.box else "-"
        print(f"{f.id}\t{f.kind}\t{f.product_id}\t{f.photo}\tbox {box}\t{f.search_id or f.origin}")
    print(f"{len(photos)} feedback photo(s)", file=sys.stderr)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    options = dict(_where(args.option) or {})
    if args.backgrounds:
        options["backgrounds"] = args.backgrounds
    with Catalog.open(args.catalog, threads=args.threads) as cat:
        bars = Bars(args.quiet)
        report = cat.tune(options, progress=bars)
        bars.close()
        info = cat.info()
    print(
        f"tuned on {report['images']} photos of {report['products']} products in "
        f"{(report['seconds_views'] + report['seconds_training']) / 60:.1f} min (training accuracy "
        f"{report['train_accuracy']:.2f}); re-embedded {info['images']} images with {report['model']}"
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    which = tuple(m.strip() for m in args.models.split(",") if m.strip())
    with Catalog.open(args.catalog, threads=args.threads) as cat:
        bars = Bars(args.quiet)
        made = cat.quantize(which, progress=bars)
        bars.close()
        images = cat.info()["images"]
    for name, path in made.items():
        print(f"int8 {name}: {path}")
    print(f"re-embedded {images} images with the int8 models")
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    with Catalog.open(args.catalog, threads=args.threads, check_models=False) as cat:
        bars = Bars(args.quiet)
        n = cat.reindex(progress=bars)
        bars.close()
    print(f"re-embedded {n} image(s) with the current model files")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lookalike.eval import evaluate, format_table

    labels = Path(args.labels)
    root = Path(args.root) if args.root else labels.parent
    if args.report:  # refused before hours of embedding, not after
        report = Path(args.report)
        if report.is_dir() or not os.access(next(p for p in [report.parent, *report.parents] if p.exists()), os.W_OK):
            raise LookalikeError(f"--report {report}: not a file that can be written")
    options = dict(_where(args.config) or {})
    cache = Path(args.cache) if args.cache else None
    bars = Bars(args.quiet)
    if args.feedback and not (args.tune or args.tune_on):
        raise LookalikeError("--feedback is what tuning learns from: give --tune or --tune-on too")
    if args.tune or args.tune_on:
        from lookalike.eval import tune_on_rows

        # closed set: the gallery rows (the shop's catalog; queries are never seen); open set: other rows
        rows = args.tune_on or args.gallery
        model, _ = tune_on_rows(labels, root, args.label, rows, dict(_where(args.tune_option) or {}), options,
                                args.threads, bars, args.image_column, cache, args.feedback)  # fmt: skip
        options = {"whiten": "0", **options, "embedder": str(model)}
    result = evaluate(
        labels, root, args.label, args.query, args.gallery, options, threads=args.threads, cache_path=cache,
        progress=bars, image_column=args.image_column, store=args.store, details=bool(args.report),
        never_query=args.feedback,
    )  # fmt: skip
    bars.close()
    for where, reason in result.failed:
        print(f"skipped {where}: {reason}", file=sys.stderr)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    if args.report:
        from lookalike.report import write_report

        print(f"report: {write_report(result, Path(args.report), f'lookalike eval · {labels.name}')}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.action == "pull":
        tgz = Path(args.objectron_tgz) if args.objectron_tgz else None
        bars = Bars(unit="step")
        paths = pull_models(force=args.force, objectron_tgz=tgz, progress=bars)
        bars.close()
        for path in paths:
            print(f"ok {path}")
        return 0
    bad = 0
    for status in check_models():
        print(f"{'ok' if status.ok else 'MISSING'} {status.path} ({status.reason})")
        bad += not status.ok
    if bad:
        print(PULL_HINT, file=sys.stderr)
    return 1 if bad else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lookalike", description="Visual product search for shoe catalogs.")
    sub = p.add_subparsers(dest="command", required=True)

    def catalog_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--catalog", required=True, help="catalog directory")

    sp = sub.add_parser(
        "index", help="index a folder of images or a manifest (incremental)",
        epilog="exit status: 0 done; 3 done, but some inputs were skipped (listed on stderr); 2 error, nothing done",
    )  # fmt: skip
    sp.add_argument(
        "source",
        help="folder (sub-folder = product), .csv/.parquet/.jsonl manifest, or a product "
        "feed: Google Merchant Center (.tsv/.txt/.xml) or a Shopify export (.csv)",
    )
    catalog_arg(sp)
    sp.add_argument(
        "--format",
        choices=["auto", "manifest", "merchant", "shopify"],
        default="auto",
        help="the source's layout (default: told by its header or XML namespace)",
    )
    sp.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="fetch image URLs on private addresses too (a shop's own intranet server)",
    )
    sp.add_argument("--detector", help="detector ONNX (YOLOv8 layout); default: Open Images SSD")
    sp.add_argument("--embedder", help="embedder ONNX; default: EfficientNet-Lite0")
    sp.add_argument("--config", action="append", metavar="KEY=VALUE",
                    help="pipeline option for a new catalog, repeatable (as in eval), e.g. embed_size=224")  # fmt: skip
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--store", metavar="STORE",
                    help="where a new catalog's vectors are searched: local (default), milvus:///path/lite.db "
                         "(Milvus Lite) or milvus://host:19530 (token: $LOOKALIKE_MILVUS_TOKEN)")  # fmt: skip
    sp.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                    help="embed on Ray Data actors: alone, a Ray started here; with an address (auto, "
                         "ray://host:10001), a running cluster whose workers reach the images")  # fmt: skip
    sp.add_argument("--workers", type=int, help="Ray actors (default: the CPUs of Ray's cluster)")
    sp.add_argument("--id-column", default="product_id", help="manifest column of the product id")
    sp.add_argument("--image-column", default="image", help="manifest column of the image path or URL")
    sp.add_argument("--metadata-column", action="append", metavar="NAME",
                    help="manifest column kept as metadata, repeatable (default: every other column)")  # fmt: skip
    sp.add_argument("--keep-missing", action="store_true", help="keep images this source no longer lists")
    sp.add_argument("--dry-run", action="store_true", help="say what would be indexed and removed; write nothing")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_index)

    sp = sub.add_parser("search", help="find the catalog products most like a photo")
    sp.add_argument("image", nargs="?", help="image path or http(s) URL")
    catalog_arg(sp)
    sp.add_argument("--product", metavar="ID", help="instead of a photo: more like this catalog product")
    sp.add_argument("-k", type=int, default=10)
    sp.add_argument(
        "--where",
        action="append",
        metavar="KEY=VALUE",
        help="metadata filter, repeatable; VALUE compared without case, or LOW..HIGH a numeric range",
    )
    sp.add_argument(
        "--rank",
        default=DEFAULT_RANK,
        choices=RANKS,
        help="a product's score: its best image, or the mean of its best 2 or 3",
    )
    sp.add_argument("--box", help="detected box number (0 = first) to search with, whole, or x1,y1,x2,y2 in pixels")
    sp.add_argument(
        "--collapse",
        metavar="KEY",
        help="one result per value of this metadata key, e.g. item_group_id (a model's variants)",
    )
    sp.add_argument("--min-score", type=float, metavar="S",
                    help="show the products scoring at least S (-1 to 1) even under the catalog's no-close-match "
                         "threshold (still reported); e.g. 0 for the closest products anyway")  # fmt: skip
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_search)

    sp = sub.add_parser("store", help="where the catalog's vectors are searched")
    store = sp.add_subparsers(dest="store_command", required=True)
    sp = store.add_parser("migrate", help="move the vectors to another store, without re-embedding")
    catalog_arg(sp)
    sp.add_argument("--to", required=True, metavar="STORE", help="local, milvus:///path/lite.db or milvus://host:19530")
    sp.set_defaults(func=cmd_store_migrate)

    sp = sub.add_parser("info", help="catalog size and configuration")
    catalog_arg(sp)
    sp.add_argument("--duplicates", action="store_true",
                    help="also list products of near-identical photos (a common catalog error)")  # fmt: skip
    sp.add_argument("--threshold", type=float, default=DUPLICATE_SCORE, help="score from which photos are duplicates")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("remove", help="remove products by id")
    sp.add_argument("product_ids", nargs="+")
    catalog_arg(sp)
    sp.set_defaults(func=cmd_remove)

    sp = sub.add_parser("app", help="start the web app (Streamlit)")
    catalog_arg(sp)
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sp.add_argument("--port", type=int, default=8501)
    sp.add_argument("--keep-searches", type=int, metavar="DAYS",
                    help="keep shoppers' searches (photos included) for DAYS days, for feedback and tuning; "
                         "0 turns it off; default: as the catalog says (off unless turned on)")  # fmt: skip
    sp.set_defaults(func=cmd_app)

    sp = sub.add_parser("serve", help="start the REST API (FastAPI + uvicorn)")
    catalog_arg(sp)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--token-file", help="file holding the write token (else $LOOKALIKE_API_TOKEN)")
    sp.add_argument("--protect-reads", action="store_true", help="reads need the token too")
    sp.add_argument("--max-upload-mb", type=int, default=10)
    sp.add_argument("--threads", type=int, default=2, help="inference threads per request")
    sp.add_argument("--url-timeout", type=float, default=10.0, help="seconds for a whole image URL fetch")
    sp.add_argument("--max-url-fetches", type=int, default=8, help="URL fetches in flight; more get a 503")
    sp.add_argument("--allow-private-urls", action="store_true",
                    help="let URLs reach loopback/private addresses (tests and trusted intranets only)")  # fmt: skip
    sp.add_argument("--keep-searches", type=int, metavar="DAYS",
                    help="keep shoppers' searches (photos included) for DAYS days, for feedback and tuning; "
                         "0 turns it off; default: as the catalog says (off unless turned on)")  # fmt: skip
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("searches", help="the search log: shoppers' searches, kept only when turned on")
    acts = sp.add_subparsers(dest="action", required=True)
    sp = acts.add_parser("keep", help="keep each search for DAYS days from now on (0: off)")
    sp.add_argument("days", type=int)
    catalog_arg(sp)
    for name, text in (("list", "one line per kept search"), ("export", "kept searches as JSON lines"),
                       ("purge", "delete searches, their feedback and photos"),
                       ("report", "an HTML page: searches per day, no-match share, top products, click-through, "
                                  "the unanswered searches' photos")):  # fmt: skip
        sp = acts.add_parser(name, help=text)
        catalog_arg(sp)
        sp.add_argument("--before", metavar="DATE", help="only searches before this date (YYYY-MM-DD, UTC)")
        if name == "export":
            sp.add_argument("--out", metavar="FILE", help="write here (default: standard output)")
        if name == "report":
            sp.add_argument("--out", metavar="OUT.html", required=True)
        if name == "purge":
            sp.add_argument("--all", action="store_true", help="every kept search")
    for action in acts.choices.values():
        action.set_defaults(func=cmd_searches)

    sp = sub.add_parser("feedback", help="shoppers' photos labelled with their product, for tuning")
    acts = sp.add_subparsers(dest="action", required=True)
    sp = acts.add_parser("import", help="labelled shopper photos from a manifest (CSV, JSONL, Parquet)")
    sp.add_argument("file")
    catalog_arg(sp)
    sp.add_argument("--photo-column", default="photo", help="the photo's path or URL (default: photo)")
    sp.add_argument("--product-column", default="product_id", help="the product it shows (default: product_id)")
    sp.add_argument("-q", "--quiet", action="store_true")
    sp = acts.add_parser("list", help="one line per feedback photo")
    catalog_arg(sp)
    sp = acts.add_parser("remove", help="delete feedback photos by id")
    sp.add_argument("ids", nargs="*", type=int)
    catalog_arg(sp)
    sp.add_argument("--all", action="store_true", help="every imported photo")
    for action in acts.choices.values():
        action.set_defaults(func=cmd_feedback)

    sp = sub.add_parser("tune", help="adapt the embedder to the catalog's products (needs lookalike[tune])")
    catalog_arg(sp)
    sp.add_argument("--option", action="append", metavar="KEY=VALUE",
                    help="tuning option, repeatable: views, epochs, tail_from, dim, margin, scale, lr, batch, "
                    "original_weight, size, seed")  # fmt: skip
    sp.add_argument(
        "--backgrounds",
        help="folder of photos (floors, streets) to paste shoes onto; default: the floor photos "
        "shipped with lookalike; none: synthetic backgrounds only",
    )
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("-q", "--quiet", action="store_true")
    sp.set_defaults(func=cmd_tune)

    sp = sub.add_parser(
        "quantize", help="run int8 models calibrated on the catalog's photos (needs lookalike[quantize])"
    )
    catalog_arg(sp)
    sp.add_argument("--models", default="detector,embedder", help="which: detector, embedder or both (default)")
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("-q", "--quiet", action="store_true")
    sp.set_defaults(func=cmd_quantize)

    sp = sub.add_parser("reindex", help="re-embed every image with the current model files")
    catalog_arg(sp)
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("-q", "--quiet", action="store_true")
    sp.set_defaults(func=cmd_reindex)

    sp = sub.add_parser("eval", help="measure retrieval quality on labelled images")
    sp.add_argument("labels", help="CSV with a column of image paths (--image-column) and label columns")
    sp.add_argument("--root", help="folder the image paths are relative to (default: the CSV's folder)")
    sp.add_argument("--label", required=True, help="column whose equality makes a hit")
    sp.add_argument("--query", help="rows used as queries, e.g. scene=wild (default: all)")
    sp.add_argument("--gallery", help="rows searched, e.g. scene=catalog (default: all; never the query itself)")
    sp.add_argument("--config", action="append", metavar="KEY=VALUE",
                    help="pipeline option, repeatable: pooling=gem, flip=true, crop.strategy=whole, "
                    "crop.margin=0.1, whiten=256, qe=2 ...")  # fmt: skip
    sp.add_argument("--image-column", default="file")
    sp.add_argument(
        "--tune",
        action="store_true",
        help="tune the embedder on the gallery rows first (closed set: queries are never seen)",
    )
    sp.add_argument(
        "--tune-on",
        metavar="SELECTION",
        help="tune on these rows instead (open set), e.g. half=1 with --query/--gallery on half=2",
    )
    sp.add_argument("--tune-option", action="append", metavar="KEY=VALUE", help="tuning option, as in `tune`")
    sp.add_argument("--feedback", metavar="SELECTION",
                    help="with --tune/--tune-on: these rows are shoppers' labelled photos (feedback) to learn from "
                         "too; they are never searched with")  # fmt: skip
    sp.add_argument("--json", metavar="OUT", help="also write the metrics as JSON")
    sp.add_argument("--report", metavar="OUT.html",
                    help="also write an HTML page: metrics, Recall@k plot, worst failures, hardest labels")  # fmt: skip
    sp.add_argument("--cache", help="embedding cache file (default ~/.cache/lookalike/eval.db)")
    sp.add_argument("--store", metavar="STORE",
                    help="search through this store as a catalog on it would (e.g. milvus:///tmp/eval.db), "
                         "instead of scoring every pair exactly")  # fmt: skip
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("-q", "--quiet", action="store_true")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("models", help="fetch or check the model files")
    sp.add_argument("action", choices=["pull", "check"])
    sp.add_argument("--force", action="store_true", help="rebuild even if present")
    sp.add_argument("--objectron-tgz", help="use this `npm pack` tarball instead of running npm")
    sp.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except LookalikeError as e:
        print(f"lookalike: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("lookalike: interrupted; what was indexed so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
