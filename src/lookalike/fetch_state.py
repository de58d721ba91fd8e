"""What each image URL's last download said: its validators (ETag, Last-Modified) and the content hash
it had, so that re-indexing a feed asks the server "changed since?" instead of downloading every image
again. Its own file (`fetch.db` in the catalog directory), apart from the records: it is a cache of
the web's answers, not catalog data; deleting it costs one full download on the next run.
"""

from __future__ import annotations

import threading
from pathlib import Path

from lookalike.records import Transaction, connect

FILE = "fetch.db"


class FetchState:
    def __init__(self, directory: Path | str):
        self.path = Path(directory) / FILE
        self._db = None
        self._lock = threading.Lock()

    def _open(self):
        if self._db is None:
            self._db = connect(self.path)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS validators (url TEXT PRIMARY KEY, sha256 TEXT NOT NULL, etag TEXT, "
                "last_modified TEXT)"
            )
        return self._db

    def get(self, urls: list[str]) -> dict[str, tuple[str, str | None, str | None]]:
        """url -> (sha256, etag, last_modified) for the URLs with validators; nothing is created for a
        catalog that never fetched a URL."""
        if not urls or (self._db is None and not self.path.exists()):
            return {}
        out = {}
        with self._lock:
            db = self._open()
            for start in range(0, len(urls), 500):
                chunk = urls[start : start + 500]
                marks = ",".join("?" * len(chunk))
                q = f"SELECT url, sha256, etag, last_modified FROM validators WHERE url IN ({marks})"
                out.update({u: (s, e, m) for u, s, e, m in db.execute(q, chunk)})
        return out

    def put(self, rows: list[tuple[str, str, str | None, str | None]]) -> None:
        """(url, sha256, etag, last_modified) of downloads that gave validators."""
        rows = [r for r in rows if r[2] or r[3]]
        if not rows:
            return
        with self._lock, Transaction(self._open()) as db:
            db.executemany("INSERT OR REPLACE INTO validators VALUES (?, ?, ?, ?)", rows)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
