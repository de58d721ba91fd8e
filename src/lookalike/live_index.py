"""The live index: a `VectorIndex` kept in line with a catalog's records, in this process and across them.

It follows the records by position (image ids only grow; removals are logged), so catching up with a
commit, this process's or another's (an `index` run beside a server), reads only what came after it.
Searches are never kept waiting for a whole catch-up: it runs in steps under the index lock, many images
a step while nobody searches, few while searches wait, and a writer lets waiting searches in between
its steps (issue 13). Vectors are stored as embedded; `transform` (the learned projection, if any) maps
them, and the queries, to what the index holds: the two change together, so a large index is rebuilt
beside the live one and swapped in.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from lookalike.errors import LookalikeError, VectorsChangedError
from lookalike.index import VectorIndex, kind_of, open_index, store_backend
from lookalike.records import Records, Snapshot

log = logging.getLogger("lookalike")
# images the index takes in per catch-up step under the search lock: many while nobody searches,
# few while searches wait (the compact index at a million images: ~1.5 ms a step plus ~0.2 ms an
# image, each landing in another list: 8 images 2.3 ms, 32 7.5 ms, 128 12 ms, 512 36 ms)
CATCH_UP_STEP = 512
CATCH_UP_STEP_SEARCHED = 8
Transform = Callable[[np.ndarray], np.ndarray]
Allowed = Callable[[int], np.ndarray]  # the records' version -> the image ids a search may return


class LiveIndex:
    """The vectors of `records` in the store named `store` (`local`, `milvus://...`), searchable."""

    rebuild_beside_from = 20_000  # images from which a new transform's index is built in the background

    def __init__(self, records: Records, store: str, **index_options):
        self.records, self.store, self.index_options = records, store, index_options
        self.directory = records.directory
        self.lock = threading.RLock()  # the index: searches and each catch-up step
        self._searching = 0  # searches in progress: a writer's catch-up lets them in between its steps
        self._writers_catching_up = 0
        self._searching_guard = threading.Lock()
        self.transform: Transform | None = None
        self._index: VectorIndex | None = None
        self._seen = (0, 0)  # (last image id, last image_log seq) the index has caught up with
        self.version = records.data_version()  # the records' data_version the index has caught up with
        self._pending: Transform | None = None  # a transform whose index is being built beside the live one
        self._builder: threading.Thread | None = None

    # -- following the records --------------------------------------------------------------------
    def catch_up(self, steps: int | None = None) -> None:
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
                    version = self.records.data_version()
                    if version == self.version:
                        return
                    store = self.records.get_meta("index")
                    if store and store != self.store:  # migrated by another process: follow it
                        log.info("%s: its vectors moved to %s", self.directory, store)
                        self.store = store
                        self.drop()
                    done = True
                    if self._index is not None:
                        with self.records.reading() as snap:
                            done = self._apply(snap, CATCH_UP_STEP_SEARCHED if self._searching else CATCH_UP_STEP)
                    if done:  # a commit after `version` was read changes it again: caught up next time
                        self.version = version
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

    def _apply(self, snap: Snapshot, limit: int | None = None) -> bool:
        """Apply to the index what was committed after `_seen`: images removed (the log after the last
        seq seen) and added (ids above the last one seen, at most `limit` of them). True when that was
        everything."""
        if self._index is None:
            return True
        last_id, last_seq = self._seen
        gone = snap.removed_after(last_seq)
        if gone:
            self._index.remove(np.asarray(gone, dtype=np.int64))
        added, last_added = _feed(snap, last_id, self._index, self.mapped, limit)
        top_id, top_seq = snap.position()
        done = limit is None or added < limit
        # not done: the next step starts after the last image added; done: after every id so far
        # (an image added and removed since leaves a gap below the top)
        self._seen = (max(top_id, last_id) if done else last_added, max(top_seq, last_seq))
        return done

    # -- searching --------------------------------------------------------------------------------
    def search(self, vector: np.ndarray, k: int, allowed: Allowed | None = None) -> list[tuple[int, float]]:
        """(image id, score) of the top k for a query vector (as embedded: mapped here by the transform
        the index was built with); `allowed(version)`: only among the ids it gives for the records'
        version the index is in line with."""
        with self.searching():
            self.catch_up(steps=1)
            with self.lock:
                index = self.index()
                if index.count() == 0 or k <= 0:
                    return []
                dim = self.records.dim
                if dim is not None and vector.shape[-1] != dim:
                    raise VectorsChangedError(
                        "the catalog's vectors were rebuilt (tuned) during this search: search again"
                    )
                vector = self.mapped(vector)[0]
                ids = None
                if allowed is not None:
                    ids = allowed(self.version)
                    if ids.size == 0:
                        return []
                found, scores = index.search(vector.reshape(1, -1), k, ids)
                return [(int(i), float(s)) for i, s in zip(found, scores, strict=True)]

    @contextmanager
    def searching(self) -> Iterator[None]:
        """A search in progress, for as long as it reads (its rows included): a writer's catch-up lets
        it finish between two steps instead of making it wait for the next one."""
        with self._searching_guard:
            self._searching += 1
        try:
            yield
        finally:
            with self._searching_guard:
                self._searching -= 1

    def mapped(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as embedded -> as this index holds them."""
        return _mapper(self.transform)(vectors)

    def count(self) -> int:
        """Images a search can return now: the index's count (no SQLite scan: every search asks)."""
        with self.lock:
            return self._index.count() if self._index is not None else self.records.count_images()

    def kind(self) -> str:
        """How the index searches; told without building it when it is not built yet (a health check
        must stay instant on a catalog whose graph takes minutes to build)."""
        with self.lock:
            if self._index is not None:
                return self._index.kind
            return kind_of(self.store, self.records.count_images(), **self.index_options)

    def index(self) -> VectorIndex:
        """The index: its last saved snapshot caught up with what was written since, or else built
        from the records (in one snapshot, even while another process writes); either way logged."""
        with self.lock:
            if self._index is not None:
                return self._index
            with self.records.reading() as snap:
                return self._open(snap)

    def _open(self, snap: Snapshot) -> VectorIndex:
        count, first = snap.count(), snap.first_vector()
        if first is None:  # nothing to index yet: the vectors' size is not known, keep no index
            return _NO_VECTORS
        directory = self.directory
        dim = self.mapped(first).shape[1]
        index = self._index = open_index(self.store, directory, dim, count, self.space(), **self.index_options)
        note = getattr(index, "restored", None)
        if note is not None:
            self._seen = (int(note["id"]), int(note["seq"]))
            self._apply(snap)
            if index.count() == count:
                return index
            log.warning("%s: the saved vector index does not match the database; rebuilding it", directory)
            index.close()
            index = self._index = open_index(self.store, directory, dim, count, None, **self.index_options)
        if getattr(index, "damaged", None):
            log.warning("%s: %s; rebuilding it from the database", directory, index.damaged)
        if count >= 20_000 or getattr(index, "damaged", None):
            log.info("%s: building the vector index of %d images from the database", directory, count)
        self._seen = (0, 0)
        self._apply(snap)
        return index

    def space(self) -> str:
        """What the index's vectors depend on besides the images: the projection (and tuning, which
        rewrites the vectors and the projection together). A snapshot of another space is not used."""
        return self.records.projection_version() or "0"

    # -- a new space: a projection, another store ---------------------------------------------------
    def set_transform(self, transform: Transform | None) -> None:
        """Index vectors (and map queries) through `transform` from now on. A small or unbuilt index is
        dropped and built on the next search; a large one keeps answering, with the old transform,
        while the new one is built from a snapshot in a thread, then caught up and swapped in."""
        with self.lock:
            if self._index is None or self._index.count() < self.rebuild_beside_from:
                self.transform = transform
                self.drop()
                return
            self._pending = transform
            self._builder = threading.Thread(target=self._build_beside, args=(transform,), daemon=True)
            self._builder.start()

    def _build_beside(self, transform: Transform | None) -> None:
        with self.records.apart() as snap:
            mapped = _mapper(transform)
            dim = mapped(snap.first_vector()).shape[1]
            log.info("%s: building the index for the new projection beside the live one", self.directory)
            index = open_index(self.store, self.directory, dim, snap.count(), None, **self.index_options)
            _feed(snap, 0, index, mapped)
            position = snap.position()
        with self.lock:
            if self._pending is not transform or self._index is None:  # superseded, or dropped meanwhile
                index.close()
                return
            old = self._index
            self._index, self.transform, self._seen = index, transform, position
            self._pending = None
            with self.records.reading() as live:
                self._apply(live)  # what was written while it was built
            old.close()

    def wait_for_rebuild(self, timeout: float | None = None) -> None:
        """Block until a rebuild running beside the live index has swapped in (tests, benchmarks)."""
        builder = self._builder
        if builder is not None:
            builder.join(timeout)

    def migrate(self, store: str) -> int:
        """Move the vectors to another store (no re-embedding: they are read from the records), then
        record it and delete what the old store held. Searches keep using the old store until the swap;
        other processes follow at their next search. Returns the vectors moved."""
        store_backend(store)
        directory, records = self.directory, self.records
        if store == self.store:
            raise LookalikeError(f"{directory} already keeps its vectors in {store}")
        self.wait_for_rebuild()
        with records.write_lock:  # no write of this process meanwhile; others' are caught up after the swap
            if records.dim is None:  # nothing stored yet: only where the vectors will go changes
                records.set_meta("index", store, notify=False)
                self.store = store
                return 0
            with records.apart() as snap:
                count = snap.count()
                dim = self.mapped(np.zeros(records.dim, np.float32)).shape[1]
                index = open_index(store, directory, dim, count, None, **self.index_options)
                _feed(snap, 0, index, self.mapped)
                position = snap.position()
            if index.count() != count:
                index.drop()
                raise LookalikeError(f"{store}: holds {index.count()} vectors after the move, not {count}")
            index.save(self.space(), {"id": position[0], "seq": position[1]})
            old_store = self.store
            records.set_meta("index", store, notify=False)
            with self.lock:
                old = self._index or open_index(old_store, directory, dim, count, None, **self.index_options)
                self._index, self.store, self._seen = index, store, position
                self.version = records.data_version()
                with records.reading() as live:
                    self._apply(live)
            old.drop()
            old.close()
        log.info("%s: %d vectors moved from %s to %s", directory, count, old_store, store)
        return count

    # -- saving and closing -----------------------------------------------------------------------
    def flush(self) -> None:
        """Let the index save a snapshot for a fast next open; the data is already durable. A rebuild
        running beside the live index is waited for: the live one is of the old projection."""
        self.wait_for_rebuild()
        with self.lock:
            self.index().save(self.space(), {"id": self._seen[0], "seq": self._seen[1]})

    def drop(self) -> None:
        """Forget the index (it is built again on the next search), e.g. after the vectors changed in place."""
        with self.lock:
            if self._index is not None:
                self._index.close()
            self._index, self._seen, self._pending = None, (0, 0), None

    def discard(self) -> None:
        """Delete what the store holds for this catalog (a scratch catalog, e.g. eval's)."""
        with self.lock:
            self.index().drop()
            self.drop()

    def close(self) -> None:
        """Close, saving the index's snapshot first (a read-only catalog just says why it could not)."""
        with self.lock:
            if self._index is not None and self._pending is None:
                try:
                    self._index.save(self.space(), {"id": self._seen[0], "seq": self._seen[1]})
                except OSError as e:
                    log.warning("%s: index snapshot not saved (%s); the next open catches up", self.directory, e)
            self.drop()


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


def _mapper(transform: Transform | None) -> Transform:
    def mapped(vectors: np.ndarray) -> np.ndarray:
        vectors = np.atleast_2d(vectors).astype(np.float32)
        return transform(vectors) if transform is not None else vectors

    return mapped


def _feed(
    snap: Snapshot, after: int, index: VectorIndex, mapped: Transform, limit: int | None = None
) -> tuple[int, int]:
    """Add to `index`, mapped, the images with ids above `after` (at most `limit`). Returns how many
    were added and the last id added (`after` if none)."""
    added, last = 0, after
    for ids, vectors in snap.added_after(after, limit):
        index.add(ids, mapped(vectors))
        added, last = added + len(ids), int(ids[-1])
    return added, last
