"""A catalog's records: one directory holding a SQLite file (the source of truth) and a vector index.

SQLite (WAL) holds products, images, their content hashes and vectors as float32 blobs, a schema
version and migrations, as rclip does. The vector index (`index/`, chosen by name when the catalog is
made) holds the vectors to search, by image id, and is rebuilt from SQLite whenever it does not match
it. A write is one SQLite transaction, so a killed run loses at most the batch it was writing.

Writes go through their own connection and never hold the lock searches take: a search meanwhile
reads the last committed snapshot (WAL). The index follows every commit, this process's and
others', by position (ids only grow, removals are logged), 128 images per step, so no
write keeps a search waiting for more than one step.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lookalike.errors import LookalikeError, VectorsChangedError
from lookalike.index import VectorIndex, kind_of, open_index, store_backend

log = logging.getLogger("lookalike")
DB_NAME = "catalog.db"
SCHEMA_VERSION = 4
# a metadata value as a filter matches it: text, compared without case (ASCII, as lower() did); numbers
# (JSON numbers, or text that reads as one, as a CSV manifest gives) also as REAL, for ranges
_TERM = ("CAST(m.value AS TEXT), CASE WHEN m.type IN ('integer', 'real') THEN m.value "
         "WHEN m.type = 'text' AND trim(m.value) <> '' AND trim(m.value) NOT GLOB '*[^0-9.eE+-]*' "
         "THEN CAST(trim(m.value) AS REAL) END")  # fmt: skip
MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE products (product_id TEXT PRIMARY KEY, metadata TEXT NOT NULL DEFAULT '{}')",
        """CREATE TABLE images (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            product_id TEXT NOT NULL REFERENCES products(product_id),
            image TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            vector BLOB NOT NULL,
            crop TEXT NOT NULL,
            box TEXT,
            UNIQUE (product_id, image)
        )""",
        "CREATE INDEX images_product ON images(product_id)",
    ],
    # v2: a projection learned on the catalog (PCA whitening), applied to every vector in the index
    2: ["CREATE TABLE projection (id INTEGER PRIMARY KEY CHECK (id = 1), mean BLOB NOT NULL, matrix BLOB NOT NULL)"],
    # v3: each image remembers the source that added it (a folder, a manifest, or "api"), so indexing
    # one source prunes only its own images; files inside the catalog are stored relative to it
    3: [
        "ALTER TABLE images ADD COLUMN source TEXT",
        "CREATE INDEX images_source ON images(source)",
        lambda db: _relative_uploads(db),
    ],
    # v4: every image's product metadata as (key, value, number) rows, kept by triggers in the same
    # transaction as the images and products, so a filter is an index lookup, not a JSON scan
    4: [
        "CREATE TABLE image_terms (image_id INTEGER NOT NULL, key TEXT NOT NULL, "
        "value TEXT NOT NULL COLLATE NOCASE, num REAL)",
        "CREATE INDEX image_terms_value ON image_terms(key, value, image_id)",
        "CREATE INDEX image_terms_num ON image_terms(key, num, image_id) WHERE num IS NOT NULL",
        "CREATE INDEX image_terms_image ON image_terms(image_id)",
        f"""CREATE TRIGGER image_terms_add AFTER INSERT ON images BEGIN
            INSERT INTO image_terms(image_id, key, value, num) SELECT new.id, m.key, {_TERM}
            FROM products p, json_each(p.metadata) m WHERE p.product_id = new.product_id;
        END""",
        "CREATE TRIGGER image_terms_drop AFTER DELETE ON images BEGIN "
        "DELETE FROM image_terms WHERE image_id = old.id; END",
        f"""CREATE TRIGGER image_terms_product AFTER UPDATE OF metadata ON products
            WHEN old.metadata IS NOT new.metadata BEGIN
            DELETE FROM image_terms WHERE image_id IN (SELECT id FROM images WHERE product_id = new.product_id);
            INSERT INTO image_terms(image_id, key, value, num) SELECT i.id, m.key, {_TERM}
            FROM images i, json_each(new.metadata) m WHERE i.product_id = new.product_id;
        END""",
        f"""INSERT INTO image_terms(image_id, key, value, num) SELECT i.id, m.key, {_TERM}
            FROM images i JOIN products p USING(product_id), json_each(p.metadata) m""",
        # every removed image id, in order: with ids that only grow, (last id, last seq) is a position
        # in the catalog's history, so a saved index or another process catches up by reading what
        # came after it instead of diffing every id
        "CREATE TABLE image_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, image_id INTEGER NOT NULL)",
        "CREATE TRIGGER image_log_drop AFTER DELETE ON images BEGIN "
        "INSERT INTO image_log(image_id) VALUES (old.id); END",
    ],
}
# a filter value "LOW..HIGH" (either side may be left out) is a numeric range, both ends included
_RANGE = re.compile(r"^\s*(-?[0-9.]+(?:[eE][+-]?[0-9]+)?)?\s*\.\.\s*(-?[0-9.]+(?:[eE][+-]?[0-9]+)?)?\s*$")


def connect(path: Path) -> sqlite3.Connection:
    """The one way lookalike opens SQLite (catalogs, the eval cache): WAL, autocommit with explicit
    transactions, shared across threads behind the caller's lock, waiting on another writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    return db


@dataclass
class ImageRecord:
    product_id: str
    image: str
    sha256: str
    vector: np.ndarray | None  # None only in a dry run's plan
    crop: str = "whole"
    box: dict | None = None
    metadata: dict = field(default_factory=dict)  # the product's
    source: str | None = None  # what added it: a source's id (folder or manifest path) or "api"


@dataclass(frozen=True)
class Hit:
    """One catalog image matching a query."""

    product_id: str
    image: str
    score: float
    crop: str
    box: dict | None


UPLOADS = "uploads"
# images the index takes in per catch-up step under the search lock: many while nobody searches,
# few while searches wait (the compact index at a million images: ~1.5 ms a step plus ~0.2 ms an
# image, each landing in another list: 8 images 2.3 ms, 32 7.5 ms, 128 12 ms, 512 36 ms)
CATCH_UP_STEP = 512
CATCH_UP_STEP_SEARCHED = 8


class CatalogDB:
    """Records in SQLite and the vectors in a `VectorIndex` kept in line with them (also with writes of
    other processes, e.g. an `index` run beside a server). Vectors are stored as embedded; `transform`
    (the pipeline's learned projection, if any) maps them, and queries, to what the index holds: the
    two change together, so a large index is rebuilt beside the live one and swapped in."""

    rebuild_beside_from = 20_000  # images from which a new transform's index is built in the background

    def __init__(self, directory: Path | str, store: str | None = None, **index_options):  # fmt: skip
        """`store`: where the vectors are searched (`local`, `milvus:///path/lite.db`, `milvus://host:19530`);
        None = the one the catalog recorded ("local" for a new one)."""
        if store is not None:
            store_backend(store)  # a malformed store is refused before anything is made
        self.directory = Path(directory).resolve()  # so stored paths never depend on the working directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.index_options = index_options
        self.lock = threading.RLock()  # the read connection and the index (searches, catching up)
        self.write_lock = threading.RLock()  # the write connection: this process's writers, one at a time
        self._searching = 0  # searches in progress: a writer's catch-up lets them in between its steps
        self._writers_catching_up = 0
        self._searching_guard = threading.Lock()
        self.transform: Callable[[np.ndarray], np.ndarray] | None = None
        self._index: VectorIndex | None = None
        self._seen = (0, 0)  # (last image id, last image_log seq) the index has caught up with
        self._pending = None  # a transform whose index is being built beside the live one
        self._builder: threading.Thread | None = None
        self._allowed_cache: dict[tuple, np.ndarray] = {}
        self._values_cache: tuple = (None, {})
        try:
            self.wdb = connect(self.directory / DB_NAME)
            # FULL: a write the API acknowledged survives a power loss too, not only a killed process
            self.wdb.execute("PRAGMA synchronous=FULL")
            self._migrate()
            self.db = connect(self.directory / DB_NAME)
            self.db.execute("PRAGMA query_only=1")
            self._data_version = self._read_data_version()
        except sqlite3.DatabaseError as e:
            raise LookalikeError(f"{self.directory / DB_NAME}: not a readable catalog database ({e})") from None
        recorded = self.get_meta("index")
        if recorded and store and store != recorded:
            self.db.close()
            self.wdb.close()
            raise LookalikeError(
                f"{self.directory} keeps its vectors in {recorded!r}, not {store!r} (move them with "
                f"`lookalike store migrate --catalog {self.directory} --to {store}`)"
            )
        self.index_name = recorded or store or "local"
        if not recorded:
            self.set_meta("index", self.index_name)
        dim = self.get_meta("dim")
        self.dim = int(dim) if dim else None

    # -- schema -------------------------------------------------------------------------------
    def _migrate(self) -> None:
        version = self.wdb.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LookalikeError(
                f"{self.directory}: catalog schema {version} is newer than this lookalike ({SCHEMA_VERSION})"
            )
        for v in range(version + 1, SCHEMA_VERSION + 1):
            with _Transaction(self.wdb):
                for step in MIGRATIONS[v]:
                    step(self.wdb) if callable(step) else self.wdb.execute(step)
                self.wdb.execute(f"PRAGMA user_version={v}")

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the write connection, then the index caught up with it. Searches
        are not held up by the transaction (they take `lock`, not `write_lock`), only by each step of
        the catch-up, and the caller returns once its write is searchable."""
        with self.write_lock, _Transaction(self.wdb) as db:
            yield db
        self._catch_up()

    def get_meta(self, key: str) -> str | None:
        with self.lock:
            return _meta(self.db, key)

    def set_meta(self, key: str, value: str) -> None:
        with self._writing():
            self._set_meta(key, value)

    def _set_meta(self, key: str, value: str) -> None:
        self.wdb.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    # -- paths: files inside the catalog are stored relative to it, so it can be moved or opened from
    # -- any working directory; everything else (source images, URLs) is stored as an absolute path
    def _key(self, image: str) -> str:
        if "://" in image:
            return image
        path = Path(image)
        if not path.is_absolute():
            return image
        try:
            return path.relative_to(self.directory).as_posix()
        except ValueError:
            return image

    def _path(self, key: str) -> str:
        # string joining, not Path: it runs for every hit of every search
        return key if "://" in key or key.startswith("/") else f"{self.directory}{os.sep}{key}"

    # -- seeing other processes' writes ---------------------------------------------------------
    def _read_data_version(self) -> int:
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    def _catch_up(self, steps: int | None = None) -> None:
        """Bring the index in line with every commit since it was last caught up: this process's
        writers' (on the write connection) and other processes'. SQLite's data_version changes only on
        other connections' commits, so this costs one pragma per search when nobody writes. The lock is
        taken per step, so searches interleave with a long catch-up: `CATCH_UP_STEP` images a step
        while nobody searches, `CATCH_UP_STEP_SEARCHED` while searches are in progress. A writer
        (`steps` None) finishes its own catch-up and lets waiting searches in between its steps; a
        search takes at most `steps` itself, none while a writer of this process is at it."""
        writer = steps is None
        if not writer and self._writers_catching_up:
            return  # this process's writer is on it, and returns once its write is searchable
        if writer:
            with self._searching_guard:
                self._writers_catching_up += 1
        try:
            for n in itertools.count() if writer else range(steps):
                if n:
                    self._let_searches_in()
                with self.lock:
                    version = self._read_data_version()
                    if version == self._data_version:
                        return
                    store = _meta(self.db, "index")
                    if store and store != self.index_name:  # migrated by another process: follow it
                        log.info("%s: its vectors moved to %s", self.directory, store)
                        self.index_name = store
                        self._drop_index()
                    done = True
                    if self._index is not None:
                        with _Transaction(self.db, write=False):
                            done = self._apply_changes(CATCH_UP_STEP_SEARCHED if self._searching else CATCH_UP_STEP)
                    if done:  # a commit after `version` was read changes it again: caught up next time
                        self._data_version = version
                        return
        finally:
            if writer:
                with self._searching_guard:
                    self._writers_catching_up -= 1

    def _let_searches_in(self, patience: float = 0.002) -> None:
        """Between two catch-up steps, wait (a little) for the searches in progress: a lock is not
        fair, and a writer that takes it again at once kept a search waiting for its whole catch-up
        (0.2 s for 1,000 images at a million)."""
        deadline = time.monotonic() + patience
        while self._searching and time.monotonic() < deadline:
            time.sleep(0.0002)

    def _apply_changes(self, limit: int | None = None) -> bool:
        """Apply to the index what was committed after `_seen` (inside a read transaction): images
        removed (the log after the last seq seen) and added (ids above the last one seen, at most
        `limit` of them). True when that was everything."""
        if self._index is None:
            return True
        last_id, last_seq = self._seen
        gone = [r[0] for r in self.db.execute("SELECT image_id FROM image_log WHERE seq > ?", (last_seq,))]
        self._unindex(gone)
        added, last_added = _feed(self.db, last_id, self._index, self._mapped, limit)
        top_id, top_seq = _position_of(self.db)
        done = limit is None or added < limit
        # not done: the next step starts after the last image added; done: after every id so far
        # (an image added and removed since leaves a gap below the top)
        self._seen = (max(top_id, last_id) if done else last_added, max(top_seq, last_seq))
        return done

    # -- the learned projection: stored here, learned and applied by the pipeline -------------------
    def projection(self) -> tuple[str | None, tuple[np.ndarray, np.ndarray] | None]:
        """(version, (mean, matrix) or None): the version changes whenever any process sets it."""
        with self.lock:
            version = self.get_meta("projection_version")
            row = self.db.execute("SELECT mean, matrix FROM projection WHERE id = 1").fetchone()
        if row is None:
            return version, None
        mean = np.frombuffer(row[0], dtype=np.float32)
        return version, (mean, np.frombuffer(row[1], dtype=np.float32).reshape(len(mean), -1))

    def projection_version(self) -> str | None:
        return self.get_meta("projection_version")

    def set_projection(self, arrays: tuple[np.ndarray, np.ndarray] | None) -> None:
        with self._writing():
            self._write_projection(arrays)

    def _write_projection(self, arrays: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.wdb.execute("DELETE FROM projection")
        if arrays is not None:
            mean, matrix = arrays
            blobs = np.asarray(mean, np.float32).tobytes(), np.ascontiguousarray(matrix, np.float32).tobytes()
            self.wdb.execute("INSERT INTO projection(id, mean, matrix) VALUES (1, ?, ?)", blobs)
        self._set_meta("projection_version", str(int(_meta(self.wdb, "projection_version") or 0) + 1))

    def set_transform(self, transform: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """Index vectors (and map queries) through `transform` from now on. A small or unbuilt index is
        dropped and built on the next search; a large one keeps answering, with the old transform,
        while the new one is built from a snapshot in a thread, then caught up and swapped in."""
        with self.lock:
            if self._index is None or self._index.count() < self.rebuild_beside_from:
                self.transform = transform
                self._drop_index()
                return
            self._pending = transform
            self._builder = threading.Thread(target=self._build_beside, args=(transform,), daemon=True)
            self._builder.start()

    def _build_beside(self, transform: Callable[[np.ndarray], np.ndarray] | None) -> None:
        db = connect(self.directory / DB_NAME)
        try:
            with _Transaction(db, write=False):
                count = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
                first = db.execute("SELECT vector FROM images ORDER BY id LIMIT 1").fetchone()
                mapped = _mapper(transform)
                dim = mapped(np.frombuffer(first[0], dtype=np.float32)).shape[1]
                log.info("%s: building the index for the new projection beside the live one", self.directory)
                index = open_index(self.index_name, self.directory, dim, count, None, **self.index_options)
                _feed(db, 0, index, mapped)
                position = _position_of(db)
        finally:
            db.close()
        with self.lock:
            if self._pending is not transform or self._index is None:  # superseded, or dropped meanwhile
                index.close()
                return
            old = self._index
            self._index, self.transform, self._seen = index, transform, position
            self._pending = None
            with _Transaction(self.db, write=False):
                self._apply_changes()  # what was written while it was built
            old.close()

    def migrate(self, store: str) -> int:
        """Move the vectors to another store (no re-embedding: they are read from SQLite), then record
        it and delete what the old store held. Searches keep using the old store until the swap; other
        processes follow at their next search. Returns the vectors moved."""
        store_backend(store)
        if store == self.index_name:
            raise LookalikeError(f"{self.directory} already keeps its vectors in {store}")
        self.wait_for_rebuild()
        with self.write_lock:  # no write of this process meanwhile; others' are caught up after the swap
            if self.dim is None:  # nothing stored yet: only where the vectors will go changes
                with _Transaction(self.wdb):
                    self._set_meta("index", store)
                self.index_name = store
                return 0
            db = connect(self.directory / DB_NAME)
            try:
                with _Transaction(db, write=False):
                    count = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
                    dim = self._mapped(np.zeros(self.dim or 1, np.float32)).shape[1]
                    index = open_index(store, self.directory, dim, count, None, **self.index_options)
                    _feed(db, 0, index, self._mapped)
                    position = _position_of(db)
            finally:
                db.close()
            if index.count() != count:
                index.drop()
                raise LookalikeError(f"{store}: holds {index.count()} vectors after the move, not {count}")
            index.save(self._space(), {"id": position[0], "seq": position[1]})
            old_store = self.index_name
            with _Transaction(self.wdb):
                self._set_meta("index", store)
            with self.lock:
                old = self._index or open_index(old_store, self.directory, dim, count, None, **self.index_options)
                self._index, self.index_name, self._seen = index, store, position
                self._data_version = self._read_data_version()
                with _Transaction(self.db, write=False):
                    self._apply_changes()
            old.drop()
            old.close()
        log.info("%s: %d vectors moved from %s to %s", self.directory, count, old_store, store)
        return count

    def wait_for_rebuild(self, timeout: float | None = None) -> None:
        """Block until a rebuild running beside the live index has swapped in (tests, benchmarks)."""
        builder = self._builder
        if builder is not None:
            builder.join(timeout)

    def _mapped(self, vectors: np.ndarray) -> np.ndarray:
        return _mapper(self.transform)(vectors)

    def vectors(self) -> np.ndarray:
        """Every stored vector, as embedded (what a projection is learned on)."""
        with self.lock:
            blobs = [r[0] for r in self.db.execute("SELECT vector FROM images ORDER BY id")]
        return np.stack([np.frombuffer(b, dtype=np.float32) for b in blobs]) if blobs else np.zeros((0, self.dim or 0))

    # -- writes -------------------------------------------------------------------------------
    def add(self, records: list[ImageRecord], replace_products: list[str] = ()) -> list[str]:
        """Insert or replace images; `replace_products` first drops every image of those products,
        in the same transaction, so a reader sees the old product or the new one, never a mix.
        Returns the images dropped by the replacement and not added back."""
        if not records:
            return []
        dim = records[0].vector.shape[-1]
        with self._writing() as db:
            if self.dim is None:
                self.dim = dim
            if any(r.vector.shape != (self.dim,) for r in records):
                raise LookalikeError(f"vector size differs from the catalog's ({self.dim})")
            dropped: set[str] = set()
            if _meta(db, "dim") is None:
                self._set_meta("dim", str(self.dim))
            for product_id in replace_products:
                dropped |= {r[0] for r in db.execute("SELECT image FROM images WHERE product_id=?", (product_id,))}
                db.execute("DELETE FROM images WHERE product_id=?", (product_id,))
            for r in records:
                key = self._key(r.image)
                dropped.discard(key)
                db.execute(
                    "INSERT INTO products(product_id, metadata) VALUES(?, ?) "
                    "ON CONFLICT(product_id) DO UPDATE SET metadata=excluded.metadata",
                    (r.product_id, json.dumps(r.metadata, sort_keys=True)),
                )
                # a new id even for an image stored before: the index follows ids (and the removal log)
                db.execute("DELETE FROM images WHERE product_id=? AND image=?", (r.product_id, key))
                db.execute(
                    "INSERT INTO images(product_id, image, sha256, vector, crop, box, source) VALUES(?,?,?,?,?,?,?)",
                    (r.product_id, key, r.sha256, r.vector.astype(np.float32).tobytes(), r.crop,
                     json.dumps(r.box) if r.box else None, r.source),
                )  # fmt: skip
            self._drop_empty_products(replace_products)
        return [self._path(k) for k in sorted(dropped)]

    def replace_vectors(self, vectors: dict[tuple[str, str], tuple[np.ndarray, str, dict | None]],
                        meta: dict[str, str]) -> None:  # fmt: skip
        """Swap every image's vector (and crop) and the given meta in one transaction, e.g. after tuning:
        readers see all old vectors or all new ones. Refused if the catalog's images changed meanwhile."""
        with self._writing() as db:
            now = {(p, self._path(i)) for p, i in db.execute("SELECT product_id, image FROM images")}
            if now != set(vectors):
                raise LookalikeError("the catalog changed while its vectors were being rebuilt: run it again")
            db.executemany(
                "UPDATE images SET vector=?, crop=?, box=? WHERE product_id=? AND image=?",
                [(v.astype(np.float32).tobytes(), crop, json.dumps(box) if box else None, p, self._key(i))
                 for (p, i), (v, crop, box) in vectors.items()],
            )  # fmt: skip
            dim = next(iter(vectors.values()))[0].shape[-1] if vectors else self.dim
            for key, value in {**meta, "dim": str(dim)}.items():
                self._set_meta(key, value)
            self._write_projection(None)
        with self.lock:  # updated in place, not by position: the index is built again
            self.dim = dim
            self._drop_index()

    def claim(self, images: list[tuple[str, str]], source: str) -> None:
        """Record `source` as the owner of these (product_id, image) pairs, vectors untouched."""
        with self._writing() as db:
            db.executemany(
                "UPDATE images SET source=? WHERE product_id=? AND image=?",
                [(source, p, self._key(i)) for p, i in images],
            )

    def remove(self, images: list[tuple[str, str]] = (), products: list[str] = ()) -> list[str]:
        """Drop images by (product_id, image) and whole products; returns the images removed."""
        rows: list[tuple[int, str]] = []
        with self._writing() as db:
            for product_id, image in images:
                rows += db.execute(
                    "SELECT id, image FROM images WHERE product_id=? AND image=?", (product_id, self._key(image))
                ).fetchall()
            for product_id in products:
                rows += db.execute("SELECT id, image FROM images WHERE product_id=?", (product_id,)).fetchall()
            db.executemany("DELETE FROM images WHERE id=?", [(i,) for i, _ in rows])
            self._drop_empty_products({p for p, _ in images} | set(products))
        return [self._path(k) for _, k in rows]

    def _drop_empty_products(self, products) -> None:
        """Drop those of these products left without images (only these: a scan of every product
        took 0.5 s per write at a million images)."""
        self.wdb.executemany(
            "DELETE FROM products WHERE product_id = ? AND NOT EXISTS (SELECT 1 FROM images WHERE product_id = ?)",
            [(p, p) for p in products],
        )

    def images_in_use(self, images: list[str]) -> set[str]:
        """Those of these images that some product still has (before deleting a stored file)."""
        with self.lock:
            return {i for i in images if self.db.execute(
                "SELECT 1 FROM images WHERE image=? LIMIT 1", (self._key(i),)).fetchone()}  # fmt: skip

    def set_products(self, metadata: dict[str, dict]) -> None:
        with self._writing() as db:
            db.executemany(
                "UPDATE products SET metadata=? WHERE product_id=?",
                [(json.dumps(m, sort_keys=True), p) for p, m in metadata.items()],
            )

    def _unindex(self, ids) -> None:
        if self._index is None or not len(ids):
            return
        self._index.remove(np.asarray(ids, dtype=np.int64))

    def _drop_index(self) -> None:
        if self._index is not None:
            self._index.close()
        self._index, self._seen, self._pending = None, (0, 0), None

    # -- reads --------------------------------------------------------------------------------
    def count(self) -> tuple[int, int]:
        with self.lock:
            products = self.db.execute("SELECT COUNT(*) FROM products").fetchone()[0]
            return products, self._count_images()

    def known(self) -> dict[tuple[str, str], tuple[str, str | None]]:
        """(product_id, image) -> (content sha256, source) of everything stored."""
        with self.lock:
            return {
                (p, self._path(i)): (s, src)
                for p, i, s, src in self.db.execute("SELECT product_id, image, sha256, source FROM images")
            }

    def products(self, ids: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        with self.lock:
            for chunk in _chunks(list(ids), 500):
                q = f"SELECT product_id, metadata FROM products WHERE product_id IN ({','.join('?' * len(chunk))})"
                out.update({p: json.loads(m) for p, m in self.db.execute(q, chunk)})
        return out

    def each_image(self, batch: int = 1000):
        """(product_id, image, vector as embedded) of every image, read a batch at a time."""
        last = 0
        while True:
            with self.lock:
                rows = self.db.execute("SELECT id, product_id, image, vector FROM images WHERE id > ? ORDER BY id "
                                       "LIMIT ?", (last, batch)).fetchall()  # fmt: skip
            if not rows:
                return
            for _, product_id, image, blob in rows:
                yield product_id, self._path(image), np.frombuffer(blob, dtype=np.float32)
            last = rows[-1][0]

    def searchable(self) -> int:
        """Images a search can return now: the live index's count (no SQLite scan: every search asks)."""
        with self.lock:
            return self._index.count() if self._index is not None else self._count_images()

    def sample_vectors(self, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
        """Up to n images' vectors as the index holds them (mapped) and their products: a random sample
        by id, so that learning from the catalog never reads all of a large one."""
        with self.lock:
            top = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
            ids = np.random.default_rng(seed).permutation(np.arange(1, top + 1))[: 2 * n].tolist() if top else []
            rows = []
            for chunk in _chunks(ids, 500):
                q = f"SELECT product_id, vector FROM images WHERE id IN ({','.join('?' * len(chunk))})"
                rows += self.db.execute(q, chunk).fetchall()
                if len(rows) >= n:
                    break
        rows = rows[:n]
        if not rows:
            return np.zeros((0, self.dim or 0), dtype=np.float32), []
        vectors = self._mapped(np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]))
        return vectors, [r[0] for r in rows]

    def product_vectors(self, product_id: str) -> np.ndarray:
        """A product's stored vectors (as embedded), one row an image; none for an unknown product."""
        with self.lock:
            blobs = [r[0] for r in self.db.execute("SELECT vector FROM images WHERE product_id=? ORDER BY id",
                                                   (product_id,))]  # fmt: skip
        return np.stack([np.frombuffer(b, dtype=np.float32) for b in blobs]) if blobs else np.zeros((0, self.dim or 0))

    def product(self, product_id: str) -> tuple[dict, list[str]] | None:
        """A product's metadata and image keys (in the order added), read in one snapshot so a reader
        never pairs one version's metadata with another's images."""
        with self.lock, _Transaction(self.db, write=False):
            row = self.db.execute("SELECT metadata FROM products WHERE product_id=?", (product_id,)).fetchone()
            rows = self.db.execute("SELECT image FROM images WHERE product_id=? ORDER BY id", (product_id,)).fetchall()
        if row is None or not rows:
            return None
        return json.loads(row[0]), [self._path(r[0]) for r in rows]

    def metadata_values(self, limit: int = 50) -> dict[str, list[str]]:
        """Distinct metadata values per key (for filter menus), keys with too many values left out;
        read from the terms index and kept until the next write."""
        key = (self._read_data_version(), limit)
        with self.lock:
            if self._values_cache[0] != key:
                values: dict[str, list[str]] = {}
                for k, v in self.db.execute(
                    "SELECT key, value FROM image_terms GROUP BY key, value ORDER BY key, value"
                ):
                    values.setdefault(k, []).append(v)
                self._values_cache = key, {k: v for k, v in values.items() if len(v) <= limit}
            return self._values_cache[1]

    def sample(self, n: int) -> list[tuple[str, str]]:
        """n images of distinct products spread evenly over the catalog."""
        with self.lock:
            rows = self.db.execute(
                "SELECT product_id, MIN(image) FROM images GROUP BY product_id ORDER BY product_id"
            ).fetchall()
        step = max(1, len(rows) // max(n, 1))
        return [(p, self._path(i)) for p, i in rows[::step][:n]]

    def index_kind(self) -> str:
        """How the index searches; told without building it when it is not built yet (a health check
        must stay instant on a catalog whose graph takes minutes to build)."""
        with self.lock:
            if self._index is not None:
                return self._index.kind
            return kind_of(self.index_name, self._count_images(), **self.index_options)

    def _count_images(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def _allowed_ids(self, where: dict[str, str]) -> np.ndarray:
        """Image ids whose product matches every filter: indexed lookups in image_terms, one string
        back from SQLite (10,000 ids as rows cost more than the lookups). Cached until the next write."""
        key = (self._data_version, tuple(sorted((str(k), str(v)) for k, v in where.items())))
        if key in self._allowed_cache:
            return self._allowed_cache[key]
        selects, params = [], []
        for name, value in where.items():
            bounds = _RANGE.match(str(value))
            if bounds and any(bounds.groups()):
                low, high = (float(b) if b else None for b in bounds.groups())
                sql = "SELECT image_id FROM image_terms WHERE key = ? AND num IS NOT NULL"
                sql += (" AND num >= ?" if low is not None else "") + (" AND num <= ?" if high is not None else "")
                selects.append(sql)
                params += [str(name), *(b for b in (low, high) if b is not None)]
            else:
                selects.append("SELECT image_id FROM image_terms WHERE key = ? AND value = ?")
                params += [str(name), str(value)]
        (text,) = self.db.execute(
            f"SELECT group_concat(image_id) FROM ({' INTERSECT '.join(selects)})", params
        ).fetchone()
        ids = np.unique(np.array(text.split(","), dtype=np.int64)) if text else np.zeros(0, dtype=np.int64)
        if len(self._allowed_cache) >= 32:
            self._allowed_cache.clear()
        self._allowed_cache[key] = ids
        return ids

    def search(self, vector: np.ndarray, k: int, where: dict[str, str] | None = None) -> list[Hit]:
        """Top-k images for a query vector (as embedded: mapped here by the transform the live index
        was built with), optionally only of products whose metadata match `where`."""
        with self._searching_guard:
            self._searching += 1
        try:
            return self._search(vector, k, where)
        finally:
            with self._searching_guard:
                self._searching -= 1

    def _search(self, vector: np.ndarray, k: int, where: dict[str, str] | None) -> list[Hit]:
        self._catch_up(steps=1)
        with self.lock:
            index = self._ensure_index()
            if index.count() == 0 or k <= 0:
                return []
            if self.dim is not None and vector.shape[-1] != self.dim:
                raise VectorsChangedError("the catalog's vectors were rebuilt (tuned) during this search: search again")
            vector = self._mapped(vector)[0]
            allowed = None
            if where:
                allowed = self._allowed_ids(where)
                if allowed.size == 0:
                    return []
            ids, scores = index.search(vector.reshape(1, -1), k, allowed)
            pairs = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True)]
            rows = {}
            for chunk in _chunks([i for i, _ in pairs], 500):
                q = f"SELECT id, product_id, image, crop, box FROM images WHERE id IN ({','.join('?' * len(chunk))})"
                rows.update({r[0]: r[1:] for r in self.db.execute(q, chunk)})
            return [
                Hit(rows[i][0], self._path(rows[i][1]), s, rows[i][2], json.loads(rows[i][3]) if rows[i][3] else None)
                for i, s in pairs
                if i in rows
            ]

    # -- the vector index ---------------------------------------------------------------------
    def _ensure_index(self) -> VectorIndex:
        """The index: its last saved snapshot caught up with what was written since, or else built
        from SQLite (in one snapshot, even while another process writes); either way logged."""
        if self._index is not None:
            return self._index
        with _Transaction(self.db, write=False):
            count = self._count_images()
            first = self.db.execute("SELECT vector FROM images ORDER BY id LIMIT 1").fetchone()
            if first is None:  # nothing to index yet: the vectors' size is not known, keep no index
                return _NO_VECTORS
            dim = self._mapped(np.frombuffer(first[0], dtype=np.float32)).shape[1]
            index = open_index(self.index_name, self.directory, dim, count, self._space(), **self.index_options)
            self._index = index
            note = getattr(index, "restored", None)
            if note is not None:
                self._seen = (int(note["id"]), int(note["seq"]))
                self._apply_changes()
                if index.count() == count:
                    return index
                log.warning("%s: the saved vector index does not match the database; rebuilding it", self.directory)
                index.close()
                index = self._index = open_index(
                    self.index_name, self.directory, dim, count, None, **self.index_options
                )
            if getattr(index, "damaged", None):
                log.warning("%s: %s; rebuilding it from the database", self.directory, index.damaged)
            if count >= 20_000 or getattr(index, "damaged", None):
                log.info("%s: building the vector index of %d images from the database", self.directory, count)
            self._seen = (0, 0)
            self._apply_changes()
        return index

    def _space(self) -> str:
        """What the index's vectors depend on besides the images: the projection (and tuning, which
        rewrites the vectors and the projection together). A snapshot of another space is not used."""
        return self.get_meta("projection_version") or "0"

    def flush(self) -> None:
        """Let the index save a snapshot for a fast next open; the data is already durable. A rebuild
        running beside the live index is waited for: the live one is of the old projection."""
        self.wait_for_rebuild()
        with self.lock:
            self._ensure_index().save(self._space(), {"id": self._seen[0], "seq": self._seen[1]})

    def discard(self) -> None:
        """Close, deleting what the store holds for this catalog (a scratch catalog, e.g. eval's)."""
        with self.lock:
            self._ensure_index().drop()
            self._drop_index()
        self.close()

    def close(self) -> None:
        """Close, saving the index's snapshot first (a read-only catalog just says why it could not)."""
        with self.lock:
            if self._index is not None and self._pending is None:
                try:
                    self._index.save(self._space(), {"id": self._seen[0], "seq": self._seen[1]})
                except OSError as e:
                    log.warning("%s: index snapshot not saved (%s); the next open catches up", self.directory, e)
            self._drop_index()
            self.db.close()
        with self.write_lock:
            self.wdb.close()


class _NoVectors:
    """The index of a catalog with no images yet: nothing is opened (a store such as Milvus would make
    a collection for it) until the first vector gives its size."""

    kind, restored = "empty", None

    def search(self, vector: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)

    def count(self) -> int:
        return 0

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        raise AssertionError("vectors are added to a real index")

    def remove(self, ids: np.ndarray) -> None: ...
    def save(self, tag: str, note: dict) -> None: ...
    def drop(self) -> None: ...
    def close(self) -> None: ...


_NO_VECTORS = _NoVectors()


def _mapper(transform: Callable[[np.ndarray], np.ndarray] | None) -> Callable[[np.ndarray], np.ndarray]:
    def mapped(vectors: np.ndarray) -> np.ndarray:
        vectors = np.atleast_2d(vectors).astype(np.float32)
        return transform(vectors) if transform is not None else vectors

    return mapped


def _position_of(db: sqlite3.Connection) -> tuple[int, int]:
    """(last image id, last image_log seq) in this connection's snapshot."""
    return (db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0],
            db.execute("SELECT COALESCE(MAX(seq), 0) FROM image_log").fetchone()[0])  # fmt: skip


def _feed(db: sqlite3.Connection, after: int, index: VectorIndex, mapped: Callable[[np.ndarray], np.ndarray],
          limit: int | None = None) -> tuple[int, int]:  # fmt: skip
    """Add to `index`, mapped, the images with ids above `after` (at most `limit`), 100,000 at a time
    (in a transaction). Returns how many were added and the last id added (`after` if none)."""
    sql = "SELECT id, vector FROM images WHERE id > ? ORDER BY id" + (" LIMIT ?" if limit is not None else "")
    ids, batch, added, last = [], [], 0, after
    for i, blob in db.execute(sql, (after,) if limit is None else (after, limit)):
        ids.append(i)
        batch.append(np.frombuffer(blob, dtype=np.float32))
        if len(ids) == 100_000:
            index.add(np.asarray(ids, dtype=np.int64), mapped(np.stack(batch)))
            added, last, ids, batch = added + len(ids), ids[-1], [], []
    if ids:
        index.add(np.asarray(ids, dtype=np.int64), mapped(np.stack(batch)))
        added, last = added + len(ids), ids[-1]
    return added, last


def _meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return row[0] if row else None


def _relative_uploads(db: sqlite3.Connection) -> None:
    """v3: uploads were stored by whatever path the server was started with (absolute, or relative to
    its working directory); store them relative to the catalog, owned by the API."""
    rows = db.execute("SELECT id, image FROM images WHERE image LIKE '%uploads/%'").fetchall()
    for image_id, image in rows:
        match = re.search(r"(?:^|/)(uploads/[0-9a-f]{2}/[0-9a-f]{64})$", image)
        if match:
            db.execute("UPDATE images SET image=?, source='api' WHERE id=?", (match.group(1), image_id))


class _Transaction:
    """One transaction. A write takes the write lock at once (IMMEDIATE) and rolls back on error; a read
    (write=False) lets several SELECTs see one snapshot (WAL readers never block writers)."""

    def __init__(self, db: sqlite3.Connection, write: bool = True):
        self.db, self.write = db, write

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE" if self.write else "BEGIN")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
