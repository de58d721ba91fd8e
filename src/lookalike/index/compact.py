"""The compact index for large catalogs, three stages: FAISS IVF with 4-bit product-quantized codes
(fast scan, 160 bytes an image) finds 400 to 1,000 candidates in an eighth of its lists (at least 64),
4-bit scalar-quantized vectors in memory (640 bytes) re-rank them, and float16 vectors on disk give the
best k + 30 their exact inner product (`rows.py`; recall@10 against exact search and RAM per image:
BENCHMARKS.md "Scale"). A filter's rows are searched one of four ways by how many they are
(`_allowed_rows`, `filtered.py`).

Saved as a snapshot beside the database: a manifest naming the IVF file, the row ids and the vector
segments. Segments are immutable and each save writes only the rows added since the last one, so a
save costs what changed and a process that has the catalog open keeps reading the files it opened.
Removed ids are left out of results at once (tombstones, saved with the snapshot); when they pass a
fifth of the lists, a save re-encodes the live vectors into fresh lists. (FAISS's remove_ids on
fast-scan lists followed by adds scrambles codes in FAISS 1.15: measured, so it is never used.)"""

from __future__ import annotations

import fcntl
import json
import math
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from lookalike.arrays import unique_ids
from lookalike.files import replace_atomically, save_array, sync
from lookalike.index.filtered import OwnLists, Scan, Subset, bitmap, mask
from lookalike.index.rows import RowStore

FORMAT = 1  # of the manifest and the files it names
RESCORED = 30  # candidates beyond k given their exact score from disk
PROBES, MIN_PROBES = 1 / 8, 64  # share of the IVF lists a search probes, and the fewest
# IVF candidates re-ranked by their in-memory codes: 1,000 from 1,024 lists on (a million images:
# recall@10 0.955 against 0.922 with 400), 400 below (100k: 1,000 cost 0.8 ms for 0.7 points more)
RERANK, RERANK_BELOW, RERANK_FROM = 1000, 400, 1024
TRAIN_SIZE = 100_000  # vectors the coarse quantizer and codebooks learn from (the first ones added)
# a filter allowing at most this many rows has their in-memory codes scanned (~0.4 µs a row; those in
# the lists a search probes), instead of the IVF scanning every row of those lists
SCAN_BELOW = 25_000
# a filter allowing a share s of the rows probes nprobe / s ** FILTER_PROBES of the catalog's IVF lists
# under a bitmap; its scan (below SCAN_BELOW rows) and its own lists nprobe / s ** SCAN_PROBES (or
# SUBSET_PROBES) lists: they cost per row of the filter, not per list (BENCHMARKS.md "Scale")
FILTER_PROBES, SCAN_PROBES, SUBSET_PROBES = 0.05, 0.3, 0.3
OWN_LISTS_AT = 2  # a filter past SCAN_WHOLE rows gets lists of its own from its n-th search (0: never)
SUBSET_ROWS = 0.5  # filters' own lists hold at most this share of the catalog's rows, all together
SCAN_WHOLE = 4096  # a filter's rows up to this many are scanned whole (~1.6 ms): a small filter is exact
POST_FILTER_SHARE = 0.5  # a filter allowing at least this share is searched unfiltered, then applied


@dataclass
class Allowed:
    """A filter's live rows (sorted) and how they are searched (see `CompactIndex._allowed_rows`)."""

    rows: np.ndarray
    how: object = None
    searches: int = 0


def lists_for(expected: int) -> int:
    """IVF lists: ~sqrt(n), a power of two in [16, 1024]: recall follows the share of lists probed, and
    more lists cost k-means time at build and coarse-quantizer time per query (BENCHMARKS.md "Scale")."""
    return int(min(1024, max(16, 2 ** round(math.log2(math.sqrt(max(expected, 1)))))))


class CompactIndex:
    kind = "ivf-pq"

    def __init__(self, directory: Path, dim: int, expected: int, tag: str | None, nlist: int | None = None,
                 nprobe: int | None = None, rerank: int | None = None, exact_below: int = 2048,
                 scan_below: int = SCAN_BELOW, scan_whole: int = SCAN_WHOLE, own_lists_at: int = OWN_LISTS_AT,
                 **_):  # fmt: skip
        self.directory, self.dim = Path(directory), dim
        self.nlist = nlist or lists_for(expected)
        self._nprobe, self._rerank, self.exact_below, self.scan_below = nprobe, rerank, exact_below, scan_below
        self.scan_whole, self.own_lists_at = scan_whole, own_lists_at
        self._lists: tuple[int, np.ndarray] | None = None  # (changes, each row's IVF list)
        self.dead = np.zeros(0, dtype=np.int64)  # rows removed: still in the IVF lists, never found
        self._not_dead = None
        self._changes = 0  # adds and removes, for what is cached per filter
        self._allowed_cache: dict[tuple, Allowed] = {}
        self._last_allowed: tuple | None = None  # (ids, changes, what _allowed_rows gave)
        self._subsets: list[Subset] = []  # filters' own lists, oldest first
        self._building: threading.Thread | None = None  # the thread copying a filter's codes
        self._lists_lock = threading.Lock()  # the catalog's lists: writes change them, that thread reads them
        self.restored: dict | None = None
        self.damaged: str | None = None  # why a snapshot that was there could not be used
        self.index: faiss.Index | None = None
        self.rows: RowStore | None = None
        self._dirty = False
        if tag is not None:
            self._load(tag)

    @property
    def nprobe(self) -> int:
        """Lists a search probes: an eighth of them, at least 64 (recall@10 0.95 at a million images)."""
        return self._nprobe or max(MIN_PROBES, int(self.nlist * PROBES))

    @nprobe.setter
    def nprobe(self, value: int | None) -> None:
        self._nprobe = value

    @property
    def rerank(self) -> int:
        """Candidates the IVF gives for re-ranking (see RERANK)."""
        return self._rerank or (RERANK if self.nlist >= RERANK_FROM else RERANK_BELOW)

    @rerank.setter
    def rerank(self, value: int | None) -> None:
        self._rerank = value

    # -- persistence ------------------------------------------------------------------------------
    def _manifest(self, tag: str) -> Path:
        return self.directory / f"compact-{tag}.json"

    def _load(self, tag: str) -> None:
        path = self._manifest(tag)
        if not path.exists():
            return
        try:
            m = json.loads(path.read_text())
            if m.get("format") != FORMAT or m["dim"] != self.dim:
                return
            index = faiss.read_index(str(self.directory / m["index"]))
            rows = RowStore.open(self.dim, self.directory, m["sq"], m["ids"], m["segments"])
            dead = np.load(self.directory / m["dead"])
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            self.damaged = f"its saved index is damaged ({e})"  # the catalog rebuilds it from SQLite
            return
        if rows.live_count() + len(dead) != index.ntotal:
            self.damaged = "its saved index's rows and lists disagree"
            return
        self.index, self.rows, self.nlist, self.restored, self.dead = _fast(index), rows, m["nlist"], m["note"], dead

    def save(self, tag: str, note: dict) -> None:
        """Write what changed since the last save, then a new manifest (atomically); files no manifest
        names are deleted (a process that opened them keeps reading them: POSIX keeps unlinked files)."""
        if self.index is None:
            return
        with open(self.directory / "compact.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process saving the same catalog waits
            # another process's save may have deleted segments this one still reads (its manifest did
            # not name them): they are written again from the open mapping before being named
            self._dirty |= self.rows.restore_missing(self.directory)
            if self._dirty or not self._manifest(tag).exists():
                self._purge()
                self.rows.flush(self.directory)
                name = f"compact-{uuid.uuid4().hex[:12]}"
                faiss.write_index(self.index, str(self.directory / f"{name}.faiss"))
                sync(self.directory / f"{name}.faiss")
                ids_file = self.rows.save_ids(self.directory, f"{name}.ids.npy")
                sq_file = self.rows.save_sq(self.directory, f"{name}.sq")
                dead_file = save_array(self.directory / f"{name}.dead.npy", self.dead)
                manifest = {"format": FORMAT, "dim": self.dim, "nlist": self.nlist, "index": f"{name}.faiss",
                            "ids": ids_file,
                            "dead": dead_file, "sq": sq_file, "segments": self.rows.segment_names(),
                            "note": note}  # fmt: skip
                replace_atomically(self._manifest(tag), json.dumps(manifest).encode())
                self._dirty = False
            m = json.loads(self._manifest(tag).read_text())
            segments = [s for s, _ in m["segments"]]
            keep = {self._manifest(tag).name, "compact.lock", m["index"], m["ids"], m["dead"], m["sq"], *segments,
                    *(Path(s).with_suffix(".sq4").name for s in segments)}  # fmt: skip
            for old in self.directory.glob("compact-*"):
                if old.name not in keep:
                    old.unlink(missing_ok=True)

    def drop(self) -> None:
        for path in [*self.directory.glob("compact-*"), self.directory / "compact.lock"]:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.index, self._subsets, self._allowed_cache, self._last_allowed = None, [], {}, None
        if self.rows is not None:
            self.rows.close()

    # -- writes ---------------------------------------------------------------------------------
    def _build(self, vectors: np.ndarray) -> None:
        """The IVF and its 4-bit codebooks, trained on the first vectors added (up to TRAIN_SIZE)."""
        nlist = max(1, min(self.nlist, len(vectors) // 39))  # FAISS wants >= 39 points per list
        m = max(d for d in range(1, self.dim // 4 + 1) if self.dim % d == 0)  # 4 dims per sub-quantizer
        index = faiss.index_factory(self.dim, f"IVF{nlist},PQ{m}x4fs", faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.min_points_per_centroid = 1  # 16 codewords a sub-quantizer: few points are enough
        train = np.ascontiguousarray(vectors[np.random.default_rng(0).permutation(len(vectors))[:TRAIN_SIZE]])
        index.train(train)
        sq = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_4bit, faiss.METRIC_INNER_PRODUCT)
        sq.train(train)
        self.index, self.nlist, self.rows = _fast(index), nlist, RowStore(self.dim, sq)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        # a build's training and encoding use every core; a catch-up step's few images one (more
        # threads would take the core the searches between the steps run on)
        faiss.omp_set_num_threads((os.cpu_count() or 1) if self.index is None or len(ids) >= 1024 else 1)
        try:
            if self.index is None:
                self._build(vectors)
            first = self.rows.next_row()  # the lists hold row numbers: no id lookup per candidate
            with self._lists_lock:
                self.index.add_with_ids(vectors, np.arange(first, first + len(ids), dtype=np.int64))
        finally:
            faiss.omp_set_num_threads(1)  # one query at a time is fastest on one thread (see local.py)
        self.rows.append(ids, vectors)
        self._dirty = True
        self._changes += 1

    def remove(self, ids: np.ndarray) -> None:
        if self.rows is None:
            return
        rows = self.rows.kill(np.asarray(ids, dtype=np.int64))
        if len(rows):
            self.dead = unique_ids(np.concatenate([self.dead, rows]))
            self._not_dead = None
            self._dirty = True
            self._changes += 1

    def _allowed_rows(self, ids: np.ndarray) -> tuple[np.ndarray, object]:
        """The live rows of these ids and how to search them, kept for the same ids until the next change
        (a shop's filters repeat; for 10,000 ids of a million the lookup alone is 3 ms): a few rows are
        scored exactly (None); up to `scan_below`, a flat index of their codes and their lists (`Scan`);
        more, a FAISS selector of them for the IVF; either replaced by lists of their own once the
        filter is searched again (`Subset`, built beside the searches: a one-off filter, a price
        slider's, is not worth their copy); most of the catalog, a mask of them to drop the others from
        an unfiltered search's candidates (a selector of 900,000 ids costs the IVF more than it saves)."""
        last = self._last_allowed  # the filters hand the same array for the same filter: no key to compute
        if last is not None and last[0] is ids and last[1] == self._changes:
            entry = last[2]
        else:
            # keyed by a sample of the ids (hashing all of 900,000 cost 10 ms a search), their count and sum
            key = (hash(ids[:: max(1, len(ids) // 4096)].tobytes()), len(ids), int(ids.sum()), self._changes)
            entry = self._allowed_cache.get(key)
            if entry is None:
                rows = self.rows.rows_of(ids)
                entry = Allowed(np.sort(rows[rows >= 0]))
                if len(entry.rows) >= POST_FILTER_SHARE * self.count():  # a look-up per candidate (a
                    entry.how = mask(entry.rows, self.rows.next_row())  # binary search in 900,000: 0.3 ms)
                elif len(entry.rows) > self.exact_below:  # its own lists from before the change, else
                    entry.how = self._carried_over(entry.rows) or self._first_way(entry.rows)  # see above
                if len(self._allowed_cache) >= 16:
                    self._allowed_cache.clear()
                self._allowed_cache[key] = entry
            self._last_allowed = ids, self._changes, entry
        entry.searches += 1
        if entry.searches >= self.own_lists_at > 0 and isinstance(entry.how, (tuple, Scan)):
            self._build_own_lists(entry)
        return entry.rows, entry.how

    def _first_way(self, rows: np.ndarray) -> Scan | tuple:
        if len(rows) <= self.scan_below:
            return Scan(self.rows.code_index(rows), self._lists_of_rows()[rows])
        return bitmap(rows, self.rows.next_row())

    def _carried_over(self, rows: np.ndarray) -> OwnLists | None:
        """A filter's own lists made before the change, brought up to date (see `Subset.cover`)."""
        if len(rows) > self.scan_whole:
            for subset in list(self._subsets):
                if subset.cover(rows, self._lists_of_rows):
                    return OwnLists(subset, mask(rows, self.rows.next_row()), len(rows))
        return None

    def _build_own_lists(self, entry: Allowed) -> None:
        """Copy a filter's codes into lists of its own in a thread of its own (0.3 s for a 10% filter at
        a million images), one build at a time; its searches go on the first way meanwhile. Filters'
        lists hold at most SUBSET_ROWS of the catalog's rows together (16 MB a 10% filter at a million
        images), the oldest dropped first (an entry of this change's cache may keep one until the next)."""
        if len(entry.rows) <= self.scan_whole or (self._building is not None and self._building.is_alive()):
            return
        index, rows, size = self.index, entry.rows, self.rows.next_row()

        def build() -> None:
            subset = Subset(index, rows, self._lists_lock)
            with self._lists_lock:
                if self.index is not index:  # a purge numbered the rows afresh
                    return
                while self._subsets and sum(s.count for s in self._subsets) + len(rows) > SUBSET_ROWS * size:
                    self._subsets.pop(0)
                self._subsets.append(subset)
                entry.how = OwnLists(subset, mask(rows, size), len(rows))

        self._building = threading.Thread(target=build, name="lookalike-filter-lists", daemon=True)
        self._building.start()

    def wait_for_own_lists(self) -> None:
        """Block until a filter's own lists being built are in use (tests, benchmarks)."""
        if self._building is not None:
            self._building.join()

    def _lists_of_rows(self) -> np.ndarray:
        """Each row's IVF list (the lists hold row numbers): read from the lists after each change,
        7 ms at a million rows, for the filters' scans to skip rows in lists far from the query."""
        if self._lists is None or self._lists[0] != self._changes:
            lists = np.zeros(self.rows.next_row(), dtype=np.int16)  # at most 1,024 lists
            inverted = self.index.invlists
            for number in range(inverted.nlist):
                if size := inverted.list_size(number):
                    lists[faiss.rev_swig_ptr(inverted.get_ids(number), size)] = number
            self._lists = self._changes, lists
        return self._lists[1]

    def _live_selector(self) -> faiss.IDSelector:
        """Every row but the tombstones, built once per change of them."""
        if self._not_dead is None:
            dead = faiss.IDSelectorBatch(self.dead)
            self._not_dead = faiss.IDSelectorNot(dead), dead  # FAISS holds a bare pointer to `dead`
        return self._not_dead[0]

    def _purge(self) -> None:
        """When tombstones pass a fifth of the lists: the live vectors re-encoded into fresh lists (same
        codebooks) and a fresh row store, so dead rows cost neither scan time nor disk."""
        if self.index is None or len(self.dead) <= 0.2 * self.index.ntotal:
            return
        live = self.rows.live_rows()
        fresh, rows = faiss.clone_index(self.index), RowStore(self.dim, self.rows.sq)
        fresh.reset()
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        try:
            for i in range(0, len(live), 100_000):
                old = live[i : i + 100_000]
                vectors = self.rows.vectors(old)
                fresh.add_with_ids(vectors, np.arange(rows.next_row(), rows.next_row() + len(old), dtype=np.int64))
                rows.append(self.rows.ids_of(old), vectors)
        finally:
            faiss.omp_set_num_threads(1)
        self.rows.close()
        self.index, self.rows, self.dead = _fast(fresh), rows, np.zeros(0, dtype=np.int64)
        self._not_dead, self._subsets = None, []  # rows numbered afresh
        self._changes += 1

    # -- reads ----------------------------------------------------------------------------------
    def count(self) -> int:
        return self.rows.live_count() if self.rows is not None else 0

    def search(self, vector: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(vector), dtype=np.float32)
        if self.index is None or self.count() == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        # OpenMP's thread count is the calling thread's own: a server's search threads start at every
        # core, where a fast scan for 1,000 candidates took 8 ms instead of 3 at a million images
        faiss.omp_set_num_threads(1)
        selector = post = None
        want = max(self.rerank, k)
        nprobe = self.nprobe
        if allowed is not None:  # as rows, live ones only
            allowed, selector = self._allowed_rows(np.asarray(allowed, dtype=np.int64))
            if len(allowed) <= max(self.exact_below, k):  # few enough to score them all
                return self._exact(q, allowed, k)
            # a filter's best k lie as far out as the best k / share of all: probe more lists as it narrows
            share = len(allowed) / max(self.count(), 1)
            if isinstance(selector, Scan):  # their codes scanned, those in the probed lists
                lists = self.nlist if len(allowed) <= self.scan_whole else \
                    int(min(self.nlist, math.ceil(nprobe / share**SCAN_PROBES)))  # fmt: skip
                return self._exact(q, allowed[selector.search(self.index.quantizer, q, lists, k + RESCORED)], k)
            if isinstance(selector, OwnLists):  # its rows' codes only: more lists cost a tenth as much
                nprobe = int(min(self.nlist, math.ceil(nprobe / share**SUBSET_PROBES)))
            else:
                nprobe = int(min(self.nlist, math.ceil(nprobe / share**FILTER_PROBES)))
            if isinstance(selector, np.ndarray):  # applied after: as many allowed candidates as unfiltered has
                post, selector, want = selector, None, math.ceil(want / share)
        while True:
            if isinstance(selector, OwnLists):
                found = selector.search(q, min(nprobe, self.nlist), want)
            else:
                params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist))
                if isinstance(selector, tuple):  # only live rows (above)
                    params.sel = selector[0]
                elif len(self.dead):
                    params.sel = self._live_selector()
                _, found = self.index.search(q, want, params=params)
                found = found[0][found[0] >= 0]
            if post is not None:  # dropped after: the rows the filter does not allow
                found = found[post[found]]
            if len(found) >= min(k, self.count() if allowed is None else len(allowed)) or nprobe >= self.nlist:
                break
            nprobe *= 4
        return self._exact(q, found[:want], k)

    def _exact(self, q: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-rank `rows` by their in-memory codes, then score the best k + 30 exactly from disk (k + 10
        lost 2.4 points of recall@10 at 100k to the codes' error; k + 60 gains nothing more);
        returns (image ids, scores)."""
        if not len(rows):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if len(rows) > k + RESCORED:
            approx = self.rows.approximate_scores(rows, q[0])
            rows = rows[np.argpartition(-approx, k + RESCORED)[: k + RESCORED]]
        scores = self.rows.vectors(rows) @ q[0]
        top = np.argsort(-scores, kind="stable")[:k]
        return self.rows.ids_of(rows[top]), scores[top].astype(np.float32)


def _fast(index: faiss.Index) -> faiss.Index:
    """FAISS's fast-scan kernel 15 for one query at a time: 1.5 ms instead of 2.45 (the default's
    choice) over 64 of 1,024 lists at a million images, the same candidates (BENCHMARKS.md "Scale")."""
    index.implem = 15
    return index
