"""The embedded store: one directory holding a SQLite file and a FAISS index cache.

SQLite (WAL) is the source of truth: products, images, their content hashes and vectors as
float32 blobs, a schema version and migrations, as rclip does. The FAISS index lives in memory,
built from SQLite on open (or read from `index-<generation>.faiss` when it matches the database),
exact (flat inner product) for small catalogs and HNSW above `hnsw_threshold` images.
A write is one SQLite transaction, so a killed run loses at most the batch it was writing.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from pathlib import Path

import faiss
import numpy as np

from lookalike.embed import Whitening
from lookalike.errors import LookalikeError, VectorsChangedError
from lookalike.store.base import Hit, ImageRecord

DB_NAME = "catalog.db"
# One query at a time is faster on one OpenMP thread, and idle OpenMP threads spin against ONNX
# Runtime's and OpenBLAS's on small machines (measured: 12.7 ms -> 2.5 ms per search of 10k
# whitened vectors on 2 cores). Index builds use every core (see _build_index).
faiss.omp_set_num_threads(1)
SCHEMA_VERSION = 3
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
}
UPLOADS = "uploads"


class LocalStore:
    def __init__(self, directory: Path | str, hnsw_threshold: int = 20_000, hnsw_m: int = 32,
                 ef_construction: int = 80, ef_search: int = 256):  # fmt: skip
        self.directory = Path(directory).resolve()  # so stored paths never depend on the working directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hnsw_threshold = hnsw_threshold
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.lock = threading.RLock()
        try:
            self.db = sqlite3.connect(
                self.directory / DB_NAME, check_same_thread=False, isolation_level=None, timeout=30
            )
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a write the API acknowledged survives a power loss too, not only a killed process
            self.db.execute("PRAGMA synchronous=FULL")
            self._migrate()
            self._data_version = self._read_data_version()
        except sqlite3.DatabaseError as e:
            raise LookalikeError(f"{self.directory / DB_NAME}: not a readable catalog database ({e})") from None
        dim = self.get_meta("dim")
        self.dim = int(dim) if dim else None
        self._index: faiss.Index | None = None
        self._projection = self._load_projection()

    # -- schema -------------------------------------------------------------------------------
    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LookalikeError(
                f"{self.directory}: catalog schema {version} is newer than this lookalike ({SCHEMA_VERSION})"
            )
        for v in range(version + 1, SCHEMA_VERSION + 1):
            with self._tx():
                for step in MIGRATIONS[v]:
                    step(self.db) if callable(step) else self.db.execute(step)
                self.db.execute(f"PRAGMA user_version={v}")

    def _tx(self):
        return _Transaction(self.db)

    def get_meta(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.lock, self._tx():
            self._set_meta(key, value)

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def _bump_generation(self) -> None:
        gen = int(self.get_meta("generation") or 0) + 1
        self._set_meta("generation", str(gen))

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
        return key if "://" in key or os.path.isabs(key) else str(self.directory / key)

    # -- seeing other processes' writes ---------------------------------------------------------
    def _read_data_version(self) -> int:
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    def _catch_up(self) -> None:
        """Bring the in-memory index in line with writes made by other processes (an `index` run
        beside a server). SQLite's data_version changes only on other connections' commits, so
        this costs one pragma per search when nobody else writes."""
        version = self._read_data_version()
        if version == self._data_version:
            return
        self._data_version = version
        projection_version = self.get_meta("projection_version")
        if projection_version != self._projection_version:
            self._projection = self._load_projection()
            self._index = None
            return
        if self._index is None:
            return
        with _Transaction(self.db, write=False):
            in_db = np.fromiter((r[0] for r in self.db.execute("SELECT id FROM images")), dtype=np.int64)
            in_index = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            new = np.setdiff1d(in_db, in_index, assume_unique=True)
            gone = np.setdiff1d(in_index, in_db, assume_unique=True)
            rows = []
            for chunk in _chunks(new.tolist(), 500):
                q = f"SELECT id, vector FROM images WHERE id IN ({','.join('?' * len(chunk))})"
                rows += self.db.execute(q, chunk).fetchall()
        self._drop_from_index(gone.tolist())
        if rows and self._index is not None:
            vectors = np.stack([np.frombuffer(v, dtype=np.float32) for _, v in rows])
            self._index.add_with_ids(self._project(vectors), np.asarray([i for i, _ in rows], dtype=np.int64))

    # -- the learned projection ---------------------------------------------------------------
    def _load_projection(self) -> Whitening | None:
        self._projection_version = self.get_meta("projection_version")
        row = self.db.execute("SELECT mean, matrix FROM projection WHERE id = 1").fetchone()
        if row is None:
            return None
        mean = np.frombuffer(row[0], dtype=np.float32)
        return Whitening(mean, np.frombuffer(row[1], dtype=np.float32).reshape(len(mean), -1))

    def set_projection(self, projection: Whitening | None) -> None:
        """Vectors are stored as given; the index holds them projected, and queries are projected too."""
        with self.lock:
            with self._tx():
                self.db.execute("DELETE FROM projection")
                if projection is not None:
                    self.db.execute(
                        "INSERT INTO projection(id, mean, matrix) VALUES (1, ?, ?)",
                        (projection.mean.tobytes(), np.ascontiguousarray(projection.matrix).tobytes()),
                    )
                self._bump_generation()
                self._projection_version = str(int(self._projection_version or 0) + 1)
                self._set_meta("projection_version", self._projection_version)
            self._projection = projection
            self._index = None

    def _project(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.atleast_2d(vectors).astype(np.float32)
        return self._projection(vectors) if self._projection is not None else vectors

    def search_dim(self) -> int | None:
        """Size of the vectors in the index: the projection's when there is one."""
        return self._projection.dim if self._projection is not None else self.dim

    def vectors(self) -> np.ndarray:
        """Every stored vector, as given (what a projection is learned on)."""
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
        with self.lock:
            if self.dim is None:
                self.dim = dim
            if any(r.vector.shape != (self.dim,) for r in records):
                raise LookalikeError(f"vector size differs from the catalog's ({self.dim})")
            replaced: list[int] = []
            dropped: set[str] = set()
            new_ids: list[int] = []
            with self._tx():
                if self.get_meta("dim") is None:
                    self._set_meta("dim", str(self.dim))
                for product_id in replace_products:
                    rows = self.db.execute("SELECT id, image FROM images WHERE product_id=?", (product_id,)).fetchall()
                    replaced += [r[0] for r in rows]
                    dropped |= {r[1] for r in rows}
                    self.db.execute("DELETE FROM images WHERE product_id=?", (product_id,))
                for r in records:
                    key = self._key(r.image)
                    dropped.discard(key)
                    self.db.execute(
                        "INSERT INTO products(product_id, metadata) VALUES(?, ?) "
                        "ON CONFLICT(product_id) DO UPDATE SET metadata=excluded.metadata",
                        (r.product_id, json.dumps(r.metadata, sort_keys=True)),
                    )
                    old = self.db.execute(
                        "SELECT id FROM images WHERE product_id=? AND image=?", (r.product_id, key)
                    ).fetchone()
                    if old:
                        replaced.append(old[0])
                        self.db.execute("DELETE FROM images WHERE id=?", (old[0],))
                    cur = self.db.execute(
                        "INSERT INTO images(product_id, image, sha256, vector, crop, box, source) "
                        "VALUES(?,?,?,?,?,?,?)",
                        (r.product_id, key, r.sha256, r.vector.astype(np.float32).tobytes(), r.crop,
                         json.dumps(r.box) if r.box else None, r.source),
                    )  # fmt: skip
                    new_ids.append(cur.lastrowid)
                self._drop_empty_products()
                self._bump_generation()
            if self._index is not None:
                self._drop_from_index(replaced)
                if self._index is not None:
                    vectors = self._project(np.stack([r.vector for r in records]))
                    self._index.add_with_ids(vectors, np.asarray(new_ids, dtype=np.int64))
            return [self._path(k) for k in sorted(dropped)]

    def replace_vectors(self, vectors: dict[tuple[str, str], tuple[np.ndarray, str, dict | None]],
                        meta: dict[str, str]) -> None:  # fmt: skip
        """Swap every image's vector (and crop) and the given meta in one transaction, e.g. after tuning:
        readers see all old vectors or all new ones. Refused if the catalog's images changed meanwhile."""
        with self.lock:
            with self._tx():
                now = {(p, self._path(i)) for p, i in self.db.execute("SELECT product_id, image FROM images")}
                if now != set(vectors):
                    raise LookalikeError("the catalog changed while its vectors were being rebuilt: run it again")
                self.db.executemany(
                    "UPDATE images SET vector=?, crop=?, box=? WHERE product_id=? AND image=?",
                    [(v.astype(np.float32).tobytes(), crop, json.dumps(box) if box else None, p, self._key(i))
                     for (p, i), (v, crop, box) in vectors.items()],
                )  # fmt: skip
                dim = next(iter(vectors.values()))[0].shape[-1] if vectors else self.dim
                for key, value in {**meta, "dim": str(dim)}.items():
                    self._set_meta(key, value)
                self.db.execute("DELETE FROM projection")
                self._projection_version = str(int(self._projection_version or 0) + 1)
                self._set_meta("projection_version", self._projection_version)
                self._bump_generation()
            self.dim = dim
            self._projection = None
            self._index = None

    def claim(self, images: list[tuple[str, str]], source: str) -> None:
        """Record `source` as the owner of these (product_id, image) pairs, vectors untouched."""
        with self.lock, self._tx():
            self.db.executemany(
                "UPDATE images SET source=? WHERE product_id=? AND image=?",
                [(source, p, self._key(i)) for p, i in images],
            )

    def remove(self, images: list[tuple[str, str]] = (), products: list[str] = ()) -> list[str]:
        """Drop images by (product_id, image) and whole products; returns the images removed."""
        with self.lock:
            rows: list[tuple[int, str]] = []
            with self._tx():
                for product_id, image in images:
                    rows += self.db.execute(
                        "SELECT id, image FROM images WHERE product_id=? AND image=?", (product_id, self._key(image))
                    ).fetchall()
                for product_id in products:
                    rows += self.db.execute("SELECT id, image FROM images WHERE product_id=?", (product_id,)).fetchall()
                self.db.executemany("DELETE FROM images WHERE id=?", [(i,) for i, _ in rows])
                self._drop_empty_products()
                self._bump_generation()
            self._drop_from_index([i for i, _ in rows])
            return [self._path(k) for _, k in rows]

    def _drop_empty_products(self) -> None:
        self.db.execute("DELETE FROM products WHERE product_id NOT IN (SELECT DISTINCT product_id FROM images)")

    def images_in_use(self, images: list[str]) -> set[str]:
        """Those of these images that some product still has (before deleting a stored file)."""
        with self.lock:
            return {i for i in images if self.db.execute(
                "SELECT 1 FROM images WHERE image=? LIMIT 1", (self._key(i),)).fetchone()}  # fmt: skip

    def set_products(self, metadata: dict[str, dict]) -> None:
        with self.lock, self._tx():
            self.db.executemany(
                "UPDATE products SET metadata=? WHERE product_id=?",
                [(json.dumps(m, sort_keys=True), p) for p, m in metadata.items()],
            )

    def _drop_from_index(self, ids: list[int]) -> None:
        if not ids or self._index is None:
            return
        if isinstance(faiss.downcast_index(self._index.index), faiss.IndexFlat):
            self._index.remove_ids(np.asarray(ids, dtype=np.int64))
        else:
            self._index = None  # HNSW cannot delete: rebuilt on the next search

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
        """Distinct metadata values per key (for filter menus), keys with too many values left out."""
        values: dict[str, set] = {}
        with self.lock:
            rows = self.db.execute("SELECT metadata FROM products").fetchall()
        for (m,) in rows:
            for k, v in json.loads(m).items():
                values.setdefault(k, set()).add(str(v))
        return {k: sorted(v) for k, v in sorted(values.items()) if len(v) <= limit}

    def sample(self, n: int) -> list[tuple[str, str]]:
        """n images of distinct products spread evenly over the catalog."""
        with self.lock:
            rows = self.db.execute(
                "SELECT product_id, MIN(image) FROM images GROUP BY product_id ORDER BY product_id"
            ).fetchall()
        step = max(1, len(rows) // max(n, 1))
        return [(p, self._path(i)) for p, i in rows[::step][:n]]

    def index_kind(self) -> str:
        return "hnsw" if self._count_images() >= self.hnsw_threshold else "exact"

    def _count_images(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def _allowed_ids(self, where: dict[str, str]) -> np.ndarray:
        clauses, params = [], []
        for key, value in where.items():  # json_each: any key, with no JSON path built from user text
            clauses.append("EXISTS (SELECT 1 FROM json_each(p.metadata) m WHERE m.key = ? "
                           "AND lower(CAST(m.value AS TEXT)) = lower(?))")  # fmt: skip
            params += [str(key), str(value)]
        q = "SELECT i.id FROM images i JOIN products p USING(product_id) WHERE " + " AND ".join(clauses)
        return np.fromiter((r[0] for r in self.db.execute(q, params)), dtype=np.int64)

    def search(self, vector: np.ndarray, k: int, where: dict[str, str] | None = None) -> list[Hit]:
        with self.lock:
            self._catch_up()
            index = self._ensure_index()
            if index.ntotal == 0 or k <= 0:
                return []
            params = None
            inner = faiss.downcast_index(index.index)
            is_hnsw = isinstance(inner, faiss.IndexHNSW)
            if where:
                allowed = self._allowed_ids(where)
                if allowed.size == 0:
                    return []
                sel = faiss.IDSelectorBatch(allowed)
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.ef_search, k)) if is_hnsw \
                    else faiss.SearchParameters(sel=sel)  # fmt: skip
            elif is_hnsw:
                params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
            query = self._project(vector.reshape(1, -1))
            if query.shape[1] != index.d:
                raise VectorsChangedError("the catalog's vectors were rebuilt (tuned) during this search: search again")
            k = min(k, index.ntotal)
            scores, ids = index.search(query, k, params=params)
            pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
            if not pairs:
                return []
            rows = {}
            for chunk in _chunks([i for i, _ in pairs], 500):
                q = f"SELECT id, product_id, image, crop, box FROM images WHERE id IN ({','.join('?' * len(chunk))})"
                rows.update({r[0]: r[1:] for r in self.db.execute(q, chunk)})
            return [
                Hit(rows[i][0], self._path(rows[i][1]), s, rows[i][2], json.loads(rows[i][3]) if rows[i][3] else None)
                for i, s in pairs
                if i in rows
            ]

    # -- the FAISS index ----------------------------------------------------------------------
    def _index_path(self, generation: str) -> Path:
        return self.directory / f"index-{generation}.faiss"

    def _ensure_index(self) -> faiss.Index:
        if self._index is not None:
            return self._index
        generation = self.get_meta("generation") or "0"
        cached = self._index_path(generation)
        if cached.exists():
            try:
                self._index = faiss.read_index(str(cached))
                return self._index
            except RuntimeError:
                cached.unlink(missing_ok=True)
        self._index = self._build_index()
        return self._index

    def _build_index(self) -> faiss.Index:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        try:
            with _Transaction(self.db, write=False):  # one snapshot, even while another process writes
                return self._fill_index()
        finally:
            faiss.omp_set_num_threads(1)

    def _fill_index(self) -> faiss.Index:
        n = self._count_images()
        dim = self._projection.dim if self._projection is not None else (self.dim or 1)
        if n >= self.hnsw_threshold:
            inner = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.ef_construction
            inner.hnsw.efSearch = self.ef_search
        else:
            inner = faiss.IndexFlatIP(dim)
        index = faiss.IndexIDMap2(inner)
        batch_ids, batch_vecs = [], []
        for i, blob in self.db.execute("SELECT id, vector FROM images ORDER BY id").fetchall():
            batch_ids.append(i)
            batch_vecs.append(np.frombuffer(blob, dtype=np.float32))
            if len(batch_ids) == 20_000:
                index.add_with_ids(self._project(np.stack(batch_vecs)), np.asarray(batch_ids, dtype=np.int64))
                batch_ids, batch_vecs = [], []
        if batch_ids:
            index.add_with_ids(self._project(np.stack(batch_vecs)), np.asarray(batch_ids, dtype=np.int64))
        return index

    def flush(self) -> None:
        """Persist the index for a fast next open (only worth it for HNSW, which is slow to build)."""
        with self.lock:
            generation = self.get_meta("generation") or "0"
            target = self._index_path(generation)
            for old in self.directory.glob("index-*.faiss"):
                if old != target:
                    old.unlink(missing_ok=True)
            if self.index_kind() != "hnsw" or target.exists():
                return
            index = self._ensure_index()
            tmp = target.with_suffix(".tmp")
            faiss.write_index(index, str(tmp))
            tmp.replace(target)

    def close(self) -> None:
        with self.lock:
            self.db.close()


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
