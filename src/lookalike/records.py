"""A catalog's records: the SQLite file that is its source of truth (schema, migrations, rows).

One directory holds `catalog.db`: products with their metadata, images with their content hashes and
vectors (float32 blobs, as embedded), the learned projection, a key-value `meta` table, a schema
version and migrations, as rclip's `db.py` does. Each write is one SQLite transaction, so a killed run
loses at most the batch it was writing. Writes go through their own connection and never wait for a
reader: readers see the last committed snapshot (WAL). Whoever follows the records (the live index)
is told after every commit of this process and reads the others' through `data_version`. This module
is where the schema is defined and every row is written; nothing here knows of vector indexes.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lookalike.errors import LookalikeError

DB_NAME = "catalog.db"
SCHEMA_VERSION = 5


# a metadata value as a filter matches it: text, compared without case (ASCII, as lower() did); numbers
# (JSON numbers, or text that reads as one, as a CSV manifest gives) also as REAL, for ranges
def _term(m: str) -> str:
    return (f"CAST({m}.value AS TEXT), CASE WHEN {m}.type IN ('integer', 'real') THEN {m}.value "
            f"WHEN {m}.type = 'text' AND trim({m}.value) <> '' AND trim({m}.value) NOT GLOB '*[^0-9.eE+-]*' "
            f"THEN CAST(trim({m}.value) AS REAL) END")  # fmt: skip


_TERM = _term("m")


def _terms(image_id: str, rows: str, metadata: str, where: str) -> str:
    """INSERT of the terms of `rows`' images: one per metadata key, and one per item of a list (a feed's
    colours "Red/Blue" are stored as ["Red", "Blue"]: `color=red` matches the product)."""
    return (
        f"INSERT INTO image_terms(image_id, key, value, num) "
        f"SELECT {image_id}, m.key, {_term('m')} FROM {rows}, json_each({metadata}) m "
        f"WHERE {where} AND m.type <> 'array' "
        f"UNION ALL SELECT {image_id}, m.key, {_term('v')} FROM {rows}, json_each({metadata}) m, "
        f"json_each(m.value) v WHERE {where} AND m.type = 'array' AND v.type NOT IN ('array', 'object')"
    )


_HAS_LIST = "EXISTS (SELECT 1 FROM json_each(p.metadata) a WHERE a.type = 'array')"
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
    # v5: a metadata value that is a list gives a term per item (it was one term, the list's JSON)
    5: [
        "DROP TRIGGER image_terms_add",
        "DROP TRIGGER image_terms_product",
        f"""CREATE TRIGGER image_terms_add AFTER INSERT ON images BEGIN
            {_terms("new.id", "products p", "p.metadata", "p.product_id = new.product_id")};
        END""",
        f"""CREATE TRIGGER image_terms_product AFTER UPDATE OF metadata ON products
            WHEN old.metadata IS NOT new.metadata BEGIN
            DELETE FROM image_terms WHERE image_id IN (SELECT id FROM images WHERE product_id = new.product_id);
            {_terms("i.id", "images i", "new.metadata", "i.product_id = new.product_id")};
        END""",
        f"DELETE FROM image_terms WHERE image_id IN (SELECT i.id FROM images i JOIN products p USING(product_id) "
        f"WHERE {_HAS_LIST})",
        _terms("i.id", "images i JOIN products p USING(product_id)", "p.metadata", _HAS_LIST),
    ],
}


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


class Records:
    """The rows of one catalog directory, read and written; `after_write` callables run after each
    commit of this process (the live index catches up there, so a write returns once searchable)."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory).resolve()  # so stored paths never depend on the working directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()  # the read connection (its transactions span several statements)
        self.write_lock = threading.RLock()  # the write connection: this process's writers, one at a time
        self.after_write: list[Callable[[], None]] = []
        try:
            self.wdb = connect(self.directory / DB_NAME)
            # FULL: a write the API acknowledged survives a power loss too, not only a killed process
            self.wdb.execute("PRAGMA synchronous=FULL")
            self._migrate()
            self.db = connect(self.directory / DB_NAME)
            self.db.execute("PRAGMA query_only=1")
        except sqlite3.DatabaseError as e:
            raise LookalikeError(f"{self.directory / DB_NAME}: not a readable catalog database ({e})") from None
        dim = self.get_meta("dim")
        self.dim = int(dim) if dim else None

    def _migrate(self) -> None:
        version = self.wdb.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LookalikeError(
                f"{self.directory}: catalog schema {version} is newer than this lookalike ({SCHEMA_VERSION})"
            )
        for v in range(version + 1, SCHEMA_VERSION + 1):
            with Transaction(self.wdb):
                for step in MIGRATIONS[v]:
                    step(self.wdb) if callable(step) else self.wdb.execute(step)
                self.wdb.execute(f"PRAGMA user_version={v}")

    @contextmanager
    def writing(self, notify: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction on the write connection, then (`notify`) the `after_write` callables.
        Readers are not held up by the transaction: they take `lock`, not `write_lock`."""
        with self.write_lock, Transaction(self.wdb) as db:
            yield db
        if notify:
            for follow in self.after_write:
                follow()

    @contextmanager
    def reading(self) -> Iterator[Snapshot]:
        """Several reads in one snapshot, on the shared read connection."""
        with self.lock, Transaction(self.db, write=False):
            yield Snapshot(self.db)

    @contextmanager
    def apart(self) -> Iterator[Snapshot]:
        """One snapshot on a connection of its own, for a long read (building an index) that must not
        hold the shared connection."""
        db = connect(self.directory / DB_NAME)
        try:
            with Transaction(db, write=False):
                yield Snapshot(db)
        finally:
            db.close()

    def data_version(self) -> int:
        """Changes whenever another connection (this process's writer or another process) commits."""
        with self.lock:
            return self.db.execute("PRAGMA data_version").fetchone()[0]

    def get_meta(self, key: str) -> str | None:
        with self.lock:
            return _meta(self.db, key)

    def set_meta(self, key: str, value: str, notify: bool = True) -> None:
        with self.writing(notify):
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

    def path(self, key: str) -> str:
        # string joining, not Path: it runs for every hit of every search
        return key if "://" in key or key.startswith("/") else f"{self.directory}{os.sep}{key}"

    # -- the learned projection: stored here, learned and applied by the pipeline -------------------
    def projection(self) -> tuple[str | None, tuple[np.ndarray, np.ndarray] | None]:
        """(version, (mean, matrix) or None): the version changes whenever any process sets it."""
        with self.reading() as snap:
            version = _meta(snap.db, "projection_version")
            row = snap.db.execute("SELECT mean, matrix FROM projection WHERE id = 1").fetchone()
        if row is None:
            return version, None
        mean = np.frombuffer(row[0], dtype=np.float32)
        return version, (mean, np.frombuffer(row[1], dtype=np.float32).reshape(len(mean), -1))

    def projection_version(self) -> str | None:
        return self.get_meta("projection_version")

    def set_projection(self, arrays: tuple[np.ndarray, np.ndarray] | None) -> None:
        with self.writing():
            self._write_projection(arrays)

    def _write_projection(self, arrays: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.wdb.execute("DELETE FROM projection")
        if arrays is not None:
            mean, matrix = arrays
            blobs = np.asarray(mean, np.float32).tobytes(), np.ascontiguousarray(matrix, np.float32).tobytes()
            self.wdb.execute("INSERT INTO projection(id, mean, matrix) VALUES (1, ?, ?)", blobs)
        self._set_meta("projection_version", str(int(_meta(self.wdb, "projection_version") or 0) + 1))

    # -- writes -------------------------------------------------------------------------------
    def add(self, records: list[ImageRecord], replace_products: list[str] = ()) -> list[str]:
        """Insert or replace images; `replace_products` first drops every image of those products,
        in the same transaction, so a reader sees the old product or the new one, never a mix.
        Returns the images dropped by the replacement and not added back."""
        if not records:
            return []
        dim = records[0].vector.shape[-1]
        with self.writing() as db:
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
        return [self.path(k) for k in sorted(dropped)]

    def replace_vectors(self, vectors: dict[tuple[str, str], tuple[np.ndarray, str, dict | None]],
                        meta: dict[str, str]) -> None:  # fmt: skip
        """Swap every image's vector (and crop) and the given meta in one transaction, e.g. after tuning:
        readers see all old vectors or all new ones. Refused if the catalog's images changed meanwhile.
        The vectors change in place, not by position: whoever follows the records must start again."""
        with self.writing() as db:
            now = {(p, self.path(i)) for p, i in db.execute("SELECT product_id, image FROM images")}
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
        self.dim = dim

    def claim(self, images: list[tuple[str, str]], source: str) -> None:
        """Record `source` as the owner of these (product_id, image) pairs, vectors untouched."""
        with self.writing() as db:
            db.executemany(
                "UPDATE images SET source=? WHERE product_id=? AND image=?",
                [(source, p, self._key(i)) for p, i in images],
            )

    def remove(self, images: list[tuple[str, str]] = (), products: list[str] = ()) -> list[str]:
        """Drop images by (product_id, image) and whole products; returns the images removed."""
        rows: list[tuple[int, str]] = []
        with self.writing() as db:
            for product_id, image in images:
                rows += db.execute(
                    "SELECT id, image FROM images WHERE product_id=? AND image=?", (product_id, self._key(image))
                ).fetchall()
            for product_id in products:
                rows += db.execute("SELECT id, image FROM images WHERE product_id=?", (product_id,)).fetchall()
            db.executemany("DELETE FROM images WHERE id=?", [(i,) for i, _ in rows])
            self._drop_empty_products({p for p, _ in images} | set(products))
        return [self.path(k) for _, k in rows]

    def _drop_empty_products(self, products) -> None:
        """Drop those of these products left without images (only these: a scan of every product
        took 0.5 s per write at a million images)."""
        self.wdb.executemany(
            "DELETE FROM products WHERE product_id = ? AND NOT EXISTS (SELECT 1 FROM images WHERE product_id = ?)",
            [(p, p) for p in products],
        )

    def set_products(self, metadata: dict[str, dict]) -> None:
        with self.writing() as db:
            db.executemany(
                "UPDATE products SET metadata=? WHERE product_id=?",
                [(json.dumps(m, sort_keys=True), p) for p, m in metadata.items()],
            )

    # -- reads --------------------------------------------------------------------------------
    def count(self) -> tuple[int, int]:
        with self.lock:
            products = self.db.execute("SELECT COUNT(*) FROM products").fetchone()[0]
            return products, Snapshot(self.db).count()

    def count_images(self) -> int:
        with self.lock:
            return Snapshot(self.db).count()

    def known(self) -> dict[tuple[str, str], tuple[str, str | None]]:
        """(product_id, image) -> (content sha256, source) of everything stored."""
        with self.lock:
            return {
                (p, self.path(i)): (s, src)
                for p, i, s, src in self.db.execute("SELECT product_id, image, sha256, source FROM images")
            }

    def products(self, ids: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        with self.lock:
            for chunk in _chunks(list(ids), 500):
                q = f"SELECT product_id, metadata FROM products WHERE product_id IN ({','.join('?' * len(chunk))})"
                out.update({p: json.loads(m) for p, m in self.db.execute(q, chunk)})
        return out

    def product(self, product_id: str) -> tuple[dict, list[str]] | None:
        """A product's metadata and image keys (in the order added), read in one snapshot so a reader
        never pairs one version's metadata with another's images."""
        with self.reading() as snap:
            row = snap.db.execute("SELECT metadata FROM products WHERE product_id=?", (product_id,)).fetchone()
            rows = snap.db.execute("SELECT image FROM images WHERE product_id=? ORDER BY id", (product_id,)).fetchall()
        if row is None or not rows:
            return None
        return json.loads(row[0]), [self.path(r[0]) for r in rows]

    def hits(self, pairs: list[tuple[int, float]]) -> list[Hit]:
        """The images of (image id, score) pairs, in that order; ids removed meanwhile are left out."""
        rows = {}
        with self.lock:
            for chunk in _chunks([i for i, _ in pairs], 500):
                q = f"SELECT id, product_id, image, crop, box FROM images WHERE id IN ({','.join('?' * len(chunk))})"
                rows.update({r[0]: r[1:] for r in self.db.execute(q, chunk)})
        return [
            Hit(rows[i][0], self.path(rows[i][1]), s, rows[i][2], json.loads(rows[i][3]) if rows[i][3] else None)
            for i, s in pairs
            if i in rows
        ]

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
                yield product_id, self.path(image), np.frombuffer(blob, dtype=np.float32)
            last = rows[-1][0]

    def vectors(self) -> np.ndarray:
        """Every stored vector, as embedded (what a projection is learned on)."""
        with self.lock:
            blobs = [r[0] for r in self.db.execute("SELECT vector FROM images ORDER BY id")]
        return _stack(blobs, self.dim)

    def sample_vectors(self, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
        """Up to n images' vectors (as embedded) and their products: a random sample by id, so that
        learning from the catalog never reads all of a large one."""
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
        return _stack([r[1] for r in rows], self.dim), [r[0] for r in rows]

    def product_vectors(self, product_id: str) -> np.ndarray:
        """A product's stored vectors (as embedded), one row an image; none for an unknown product."""
        with self.lock:
            blobs = [r[0] for r in self.db.execute("SELECT vector FROM images WHERE product_id=? ORDER BY id",
                                                   (product_id,))]  # fmt: skip
        return _stack(blobs, self.dim)

    def images_in_use(self, images: list[str]) -> set[str]:
        """Those of these images that some product still has (before deleting a stored file)."""
        with self.lock:
            return {i for i in images if self.db.execute(
                "SELECT 1 FROM images WHERE image=? LIMIT 1", (self._key(i),)).fetchone()}  # fmt: skip

    def sample(self, n: int) -> list[tuple[str, str]]:
        """n images of distinct products spread evenly over the catalog."""
        with self.lock:
            rows = self.db.execute(
                "SELECT product_id, MIN(image) FROM images GROUP BY product_id ORDER BY product_id"
            ).fetchall()
        step = max(1, len(rows) // max(n, 1))
        return [(p, self.path(i)) for p, i in rows[::step][:n]]

    def query(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        """A read of the caller's own (the filters' lookups over `image_terms`)."""
        with self.lock:
            return self.db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self.lock:
            self.db.close()
        with self.write_lock:
            self.wdb.close()


Batch = tuple[np.ndarray, np.ndarray]  # image ids, their vectors


class Snapshot:
    """Reads in one snapshot of the records, as the live index follows them: by position (ids only
    grow; removals are logged in `image_log`)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def first_vector(self) -> np.ndarray | None:
        row = self.db.execute("SELECT vector FROM images ORDER BY id LIMIT 1").fetchone()
        return np.frombuffer(row[0], dtype=np.float32) if row else None

    def position(self) -> tuple[int, int]:
        """(last image id, last image_log seq)."""
        return (self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0],
                self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM image_log").fetchone()[0])  # fmt: skip

    def removed_after(self, seq: int) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT image_id FROM image_log WHERE seq > ?", (seq,))]

    def meta(self, key: str) -> str | None:
        return _meta(self.db, key)

    def added_after(self, after: int, limit: int | None = None, batch: int = 100_000) -> Iterator[Batch]:
        """(ids, vectors as embedded) of the images with ids above `after` (at most `limit`), in order,
        `batch` at a time."""
        sql = "SELECT id, vector FROM images WHERE id > ? ORDER BY id" + (" LIMIT ?" if limit is not None else "")
        ids, blobs = [], []
        for i, blob in self.db.execute(sql, (after,) if limit is None else (after, limit)):
            ids.append(i)
            blobs.append(blob)
            if len(ids) == batch:
                yield np.asarray(ids, dtype=np.int64), _stack(blobs, None)
                ids, blobs = [], []
        if ids:
            yield np.asarray(ids, dtype=np.int64), _stack(blobs, None)


def _stack(blobs: list[bytes], dim: int | None) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim or 0), dtype=np.float32)
    return np.stack([np.frombuffer(b, dtype=np.float32) for b in blobs])


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


class Transaction:
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
