"""The search log: shoppers' searches and feedback on them, kept only when the shop turns it on.

A shopper's photo is personal data. Nothing is kept until `keep(days)` turns the log on; then each
search from the API or the app is kept for that many days (its photo, the box searched, the products
shown with their scores, the time) and deleted, photo files included, once older. Feedback (a click, a
purchase, "not this") is kept with its search and goes with it. Labelled shopper photos a shop imports
(review photos, support tickets) are feedback of their own, kept until removed.

It lives apart from the catalog's records: its own SQLite file (`searches.db`, made only when the log is
turned on) and a folder of photos (`shoppers/`, content-addressed, stored as decoded: upright, without
EXIF and its location), so purging it never touches the catalog. Deleted rows are overwritten in the
file (`secure_delete`), and the write-ahead log is truncated after a purge.
"""

from __future__ import annotations

import io
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lookalike.errors import FeedbackRefused, LookalikeError
from lookalike.files import replace_atomically
from lookalike.images import sha256_bytes
from lookalike.records import Transaction, connect

LOG_NAME = "searches.db"
PHOTOS = "shoppers"
SCHEMA_VERSION = 1
KINDS = ("click", "purchase", "not_this")  # feedback on a search's results
LABEL = "label"  # an imported shopper photo with its product
EXPIRE_EVERY_S = 60.0  # how often a logging process deletes what has expired
MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE searches (
            search_id TEXT PRIMARY KEY,
            at REAL NOT NULL,
            photo TEXT NOT NULL,
            box TEXT,
            request TEXT NOT NULL,
            results TEXT NOT NULL,
            no_match INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX searches_at ON searches(at)",
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            product_id TEXT NOT NULL,
            search_id TEXT REFERENCES searches(search_id),
            photo TEXT NOT NULL,
            box TEXT,
            origin TEXT NOT NULL
        )""",
        "CREATE INDEX feedback_search ON feedback(search_id)",
        "CREATE INDEX searches_photo ON searches(photo)",  # whether a photo's file is still used
        "CREATE INDEX feedback_photo ON feedback(photo)",
    ],
}

_ADD_FEEDBACK = "INSERT INTO feedback(at, kind, product_id, search_id, photo, box, origin) VALUES (?, ?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True)
class FeedbackPhoto:
    """A shopper photo with the product it shows, as tuning takes it."""

    id: int
    kind: str
    product_id: str
    photo: Path
    box: tuple[float, float, float, float] | None
    origin: str
    at: float
    search_id: str | None


class SearchLog:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LOG_NAME
        self.photos = self.directory / PHOTOS
        self.lock = threading.RLock()
        self._db = None
        self._expired_at = 0.0
        if self.path.exists():
            self.expire()

    # -- the file: made when the log is turned on -------------------------------------------------
    def _open(self, create: bool = False):
        with self.lock:
            if self._db is None and (create or self.path.exists()):
                db = connect(self.path)
                db.execute("PRAGMA secure_delete=ON")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    db.close()
                    raise LookalikeError(f"{self.path}: search log schema {version} is newer than this lookalike")
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    with Transaction(db):
                        for step in MIGRATIONS[v]:
                            db.execute(step)
                        db.execute(f"PRAGMA user_version={v}")
                self._db = db
            return self._db

    def _write(self, sql: str, params: tuple | list = ()) -> int:
        """One statement in its own transaction (durable when this returns); the row id it inserted."""
        with self.lock, Transaction(self._open(create=True)) as db:
            return db.execute(sql, params).lastrowid

    def _read(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        with self.lock:
            db = self._open()
            return db.execute(sql, params).fetchall() if db is not None else []

    def keep_days(self) -> int:
        """How many days searches are kept; 0: the log is off (nothing is kept)."""
        rows = self._read("SELECT value FROM settings WHERE key = 'keep_days'")
        return int(rows[0][0]) if rows else 0

    def keep(self, days: int) -> None:
        """Keep each search for `days` days from now on; 0 turns the log off (what is kept stays until
        it is purged or would have expired)."""
        if not isinstance(days, int) or days < 0 or days > 3650:
            raise LookalikeError(f"keep searches for {days!r} days: expected 0 (off) to 3650")
        if days == 0 and not self.path.exists():
            return
        self._write("INSERT INTO settings(key, value) VALUES('keep_days', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(days),))  # fmt: skip
        self.expire()

    # -- searches ---------------------------------------------------------------------------------
    def record(self, image: Image.Image, box: tuple | None, request: dict, results: list[tuple[str, float]],
               no_match: bool = False) -> str | None:  # fmt: skip
        """Keep one search (the photo as searched, the box, what was asked, the products shown, whether it
        was answered "no close match") when the log is on; returns its search_id, or None when nothing
        was kept."""
        days = self.keep_days()
        if not days:
            return None
        if time.time() - self._expired_at > EXPIRE_EVERY_S:
            self.expire()
        photo = self._keep_photo(image)
        search_id = secrets.token_urlsafe(12)
        self._write("INSERT INTO searches(search_id, at, photo, box, request, results, no_match) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (search_id, time.time(), photo, json.dumps(box) if box else None, json.dumps(request),
                     json.dumps([[p, round(s, 4)] for p, s in results]), int(no_match)))  # fmt: skip
        return search_id

    def _keep_photo(self, image: Image.Image) -> str:
        """The photo's file under shoppers/, stored as decoded (JPEG: upright, no EXIF), named by the
        hash of what is stored."""
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=92)
        data = buf.getvalue()
        sha = sha256_bytes(data)
        folder = self.photos / sha[:2]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / sha
        if not path.exists():
            replace_atomically(path, data, tmp=folder / f".{sha}.tmp")
        return f"{sha[:2]}/{sha}"

    def searches(self, before: float | None = None) -> list[dict]:
        """Kept searches, oldest first (before a time, if given), each with its feedback."""
        rows = self._read("SELECT search_id, at, photo, box, request, results, no_match FROM searches "
                          "WHERE at < ? ORDER BY at", (before if before is not None else float("inf"),))  # fmt: skip
        given: dict[str, list] = {}
        for search_id, kind, product_id, at in self._read(
            "SELECT search_id, kind, product_id, at FROM feedback WHERE search_id IS NOT NULL ORDER BY id"
        ):
            given.setdefault(search_id, []).append({"kind": kind, "product_id": product_id, "at": at})
        return [{"search_id": s, "at": at, "photo": str(self.photos / photo), "box": json.loads(box) if box else None,
                 "request": json.loads(request), "no_match": bool(no_match),
                 "results": [{"product_id": p, "score": score} for p, score in json.loads(results)],
                 "feedback": given.get(s, [])}
                for s, at, photo, box, request, results, no_match in rows]  # fmt: skip

    def purge(self, before: float | None = None) -> int:
        """Delete the searches before a time (all of them with None), their feedback and the photos
        nothing kept refers to any more; returns the searches deleted."""
        cut = before if before is not None else float("inf")
        photos = [r[0] for r in self._read("SELECT photo FROM searches WHERE at < ?", (cut,))]
        if photos or before is None:
            self._delete([("DELETE FROM feedback WHERE search_id IN (SELECT search_id FROM searches WHERE at < ?)",
                           (cut,)), ("DELETE FROM searches WHERE at < ?", (cut,))], set(photos),
                         sweep=before is None)  # fmt: skip
        return len(photos)

    def expire(self) -> int:
        """Delete what is older than the log keeps (nothing while the log was never on)."""
        self._expired_at = time.time()
        days = self.keep_days()
        if not days:
            return 0
        return self.purge(time.time() - days * 86400)

    def _delete(self, statements: list[tuple[str, tuple]], photos: set[str], sweep: bool = False) -> None:
        """These deletes in one transaction, then the files of those photos that nothing kept refers to
        any more (`sweep`: of every such photo, strays a crash left included); the WAL truncated."""
        with self.lock:
            db = self._open()
            if db is None:
                return
            with Transaction(db):
                for sql, params in statements:
                    db.execute(sql, params)
            if sweep and self.photos.is_dir():
                photos |= {f"{p.parent.name}/{p.name}" for p in self.photos.glob("*/*")}
            used = "SELECT 1 FROM searches WHERE photo = ? UNION ALL SELECT 1 FROM feedback WHERE photo = ? LIMIT 1"
            for photo in photos:
                if not db.execute(used, (photo, photo)).fetchone():
                    (self.photos / photo).unlink(missing_ok=True)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- feedback ---------------------------------------------------------------------------------
    def feedback(self, search_id: str, product_id: str, kind: str, origin: str = "api") -> int:
        """Record a shopper's feedback on one of a search's results; returns its id. Refused for an
        unknown (or expired) search, an unknown kind, or a product that search did not show."""
        if kind not in KINDS:
            raise LookalikeError(f"feedback kind {kind!r}: expected one of {', '.join(KINDS)}")
        rows = self._read("SELECT photo, box, results FROM searches WHERE search_id = ?", (search_id,))
        if not rows:
            raise FeedbackRefused(f"no search {search_id!r} is kept (unknown, expired, or the log is off)", True)
        photo, box, results = rows[0]
        if product_id not in {p for p, _ in json.loads(results)}:
            raise FeedbackRefused(f"product {product_id!r} was not among the results of search {search_id!r}", False)
        return self._write(_ADD_FEEDBACK, (time.time(), kind, product_id, search_id, photo, box, origin))

    def label(self, image: Image.Image, product_id: str, box: tuple | None, origin: str) -> int:
        """Keep an imported shopper photo (upright, as decoded; `box` in its pixels) labelled with its
        product; returns its id."""
        photo = self._keep_photo(image)
        box_text = json.dumps([round(float(v), 2) for v in box]) if box else None
        return self._write(_ADD_FEEDBACK, (time.time(), LABEL, product_id, None, photo, box_text, origin))

    def feedback_photos(self, kinds: tuple[str, ...] = ("click", "purchase", LABEL)) -> list[FeedbackPhoto]:
        """Every feedback photo of these kinds, oldest first."""
        marks = ",".join("?" * len(kinds))
        rows = self._read(f"SELECT id, kind, product_id, photo, box, origin, at, search_id FROM feedback "
                          f"WHERE kind IN ({marks}) ORDER BY id", kinds)  # fmt: skip
        return [FeedbackPhoto(i, k, p, self.photos / photo, tuple(json.loads(box)) if box else None, o, at, s)
                for i, k, p, photo, box, o, at, s in rows]  # fmt: skip

    def remove_feedback(self, ids: list[int] | None = None) -> int:
        """Delete feedback by id (every imported photo with None) and the photos nothing refers to."""
        if ids is None:
            where, params = "kind = ?", (LABEL,)
        else:
            where, params = f"id IN ({','.join('?' * len(ids))})", tuple(ids)
        photos = [r[0] for r in self._read(f"SELECT photo FROM feedback WHERE {where}", params)]
        if photos:
            self._delete([(f"DELETE FROM feedback WHERE {where}", params)], set(photos))
        return len(photos)

    def close(self) -> None:
        with self.lock:
            if self._db is not None:
                self._db.close()
                self._db = None
