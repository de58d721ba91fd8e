"""How the compact index searches a filter's rows, by how many it allows (BENCHMARKS.md "Scale"):
a few are scored exactly (compact.py); up to 25,000, their 4-bit codes in a flat index (`Scan`); more,
the IVF under a bitmap of them (`bitmap`), and once the same filter is searched again, lists of their
own (`Subset`); most of the catalog, an unfiltered search whose candidates are masked after."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

# a filter's own lists are carried over a change while the rows they lack or no longer allow stay
# under this share of the filter's rows, else built again
CARRY_OVER = 0.2


class Scan:
    """A filter's rows' 4-bit codes in a flat index (position i: its i-th row) and each row's IVF list:
    a search scans those in the lists nearest the query (FAISS skips the others before their distance),
    ~0.4 µs a row, where the IVF would scan every row of those lists."""

    def __init__(self, codes: faiss.IndexScalarQuantizer, lists: np.ndarray):
        self.codes, self.lists = codes, lists

    def search(self, quantizer: faiss.Index, q: np.ndarray, nprobe: int, n: int) -> np.ndarray:
        """Positions of the best n rows by their codes among those in the nprobe lists nearest q."""
        params = None
        if nprobe < quantizer.ntotal:
            _, near = quantizer.search(q, nprobe)
            probed = np.zeros(quantizer.ntotal, dtype=bool)
            probed[near[0][near[0] >= 0]] = True
            bits = np.packbits(probed[self.lists], bitorder="little")  # referenced until the search ends
            params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(len(self.lists), faiss.swig_ptr(bits)))
        _, at = self.codes.search(q, min(n, len(self.lists)), params=params)
        return at[0][at[0] >= 0]


def bitmap(rows: np.ndarray, size: int) -> tuple[faiss.IDSelector, np.ndarray]:
    """A selector of these rows as a bitmap over every row (125 KB at a million): one memory read per
    candidate, where a hash set of 100,000 ids costs a lookup each. Returned with the bits, which
    FAISS does not own."""
    bits = np.packbits(mask(rows, size), bitorder="little")
    return faiss.IDSelectorBitmap(size, faiss.swig_ptr(bits)), bits


def mask(rows: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=bool)
    out[rows] = True
    return out


class Subset:
    """A filter's own IVF lists: its rows' fast-scan codes copied out of the catalog's lists, not
    re-encoded, so a search over them gives the candidates the catalog's lists give under a bitmap of
    the rows, but computes distances for the filter's rows only (a tenth of them at a 10% filter).
    Kept over changes: rows the filter gains are appended, rows it loses are masked after the search
    (`cover`). They share the catalog's coarse quantizer, so they live only as long as its IVF."""

    def __init__(self, index: faiss.IndexIVFPQFastScan, rows: np.ndarray, lock: threading.Lock):
        """`lock`: held by whoever changes the catalog's lists (`index`), taken here a list at a time."""
        self.index, self.lock, self.held = index, lock, np.zeros(index.ntotal, dtype=bool)
        self.lists = faiss.IndexIVFPQFastScan(index.quantizer, index.d, index.nlist, index.M, index.nbits,
                                              index.metric_type, index.bbs)  # fmt: skip
        self.lists.pq, self.lists.by_residual, self.lists.is_trained = index.pq, index.by_residual, True
        self.lists.implem = index.implem
        self.nibbles = _nibbles(index)
        self._append(rows, np.arange(index.nlist))

    @property
    def count(self) -> int:
        return int(self.lists.ntotal)

    def cover(self, rows: np.ndarray, lists_of_rows: Callable[[], np.ndarray]) -> bool:
        """Hold every one of these rows (the filter's after a change), appending the missing ones,
        unless what the filter gained and lost passes CARRY_OVER of its rows (then False)."""
        if len(self.held) < self.index.ntotal:  # rows added since (the catalog's lists number them all)
            self.held = np.concatenate([self.held, np.zeros(self.index.ntotal - len(self.held), dtype=bool)])
        missing = rows[~self.held[rows]]
        lost = self.count - (len(rows) - len(missing))
        if len(missing) + lost > CARRY_OVER * len(rows):
            return False
        if len(missing):
            self._append(missing, np.unique(lists_of_rows()[missing]))
        return True

    def search(self, q: np.ndarray, nprobe: int, n: int, allowed: np.ndarray, count: int) -> np.ndarray:
        """The best n of the `count` rows `allowed` (a mask; every one held) by their codes, in the
        nprobe lists nearest q; rows held but not allowed are dropped after, and asked for in
        proportion."""
        extra = self.count > count
        if extra:
            n = int(np.ceil(n * self.count / max(count, 1)))
        _, found = self.lists.search(q, min(n, self.count), params=faiss.SearchParametersIVF(nprobe=nprobe))
        found = found[0][found[0] >= 0]
        return found[allowed[found]] if extra else found

    def _append(self, rows: np.ndarray, lists: np.ndarray) -> None:
        """Copy these rows' codes from the catalog's lists (only `lists` hold them) to the end of ours,
        a list at a time under the lock (writes to the catalog's lists wait for one list at most)."""
        want = mask(rows, len(self.held))
        source = faiss.downcast_InvertedLists(self.index.invlists)
        block, bbs = source.block_size, self.index.bbs
        byte, shift, _ = self.nibbles
        for number in lists.tolist():
            with self.lock:
                size = source.list_size(number)
                ids = faiss.rev_swig_ptr(source.get_ids(number), size)
                at = np.flatnonzero(want[np.minimum(ids, len(want) - 1)] & (ids < len(want)))  # (newer: not ours)
                if not len(at):
                    continue
                held = np.ascontiguousarray(ids[at], dtype=np.int64)
                codes = faiss.rev_swig_ptr(source.get_codes(number), -(-size // bbs) * block)
                # each code's nibbles read from its block: (n, M) values 0..15, packed in blocks of ours
                picked = (codes[(at // bbs * block)[:, None] + byte[at % bbs]] >> shift[at % bbs]) & 15
            packed = _pack(picked, self.nibbles, bbs, block)
            self.lists.invlists.add_entries(number, len(at), faiss.swig_ptr(held), faiss.swig_ptr(packed))
            self.held[held] = True
            self.lists.ntotal += len(at)


@dataclass(frozen=True)
class OwnLists:
    """A filter's rows in a `Subset` (which may hold more rows: those another filter or an earlier
    version of this one wanted)."""

    subset: Subset
    allowed: np.ndarray  # a mask over every row
    count: int

    def search(self, q: np.ndarray, nprobe: int, n: int) -> np.ndarray:
        return self.subset.search(q, nprobe, n, self.allowed, self.count)


_LAYOUTS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _nibbles(index: faiss.IndexIVFPQFastScan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where FAISS's fast-scan blocks keep each code's nibbles: byte[p, s] and shift[p, s] of the p-th
    code's s-th sub-quantizer, and for each byte of a block the two nibbles it holds (low, high) as
    p * M + s. Read from FAISS's own packer (4 packings of position numbers, 4 bits at a time), so a
    change of its layout follows."""
    key = (index.M, index.bbs)
    if key not in _LAYOUTS:
        packer, m, bbs = index.get_CodePacker(), index.M, index.bbs
        number = np.arange(bbs * m).reshape(bbs, m)
        pairs = np.zeros((packer.block_size, 2), dtype=np.int64)
        for t in range(4):
            nib = ((number >> (4 * t)) & 15).astype(np.uint8)
            flat = np.ascontiguousarray(nib[:, 0::2] | (nib[:, 1::2] << 4))  # a flat code: 2 a byte, low first
            block = np.zeros(packer.block_size, dtype=np.uint8)
            packer.pack_all(faiss.swig_ptr(flat), faiss.swig_ptr(block))
            pairs[:, 0] |= (block & 15).astype(np.int64) << (4 * t)
            pairs[:, 1] |= (block >> 4).astype(np.int64) << (4 * t)
        byte, shift = np.zeros(bbs * m, dtype=np.int64), np.zeros(bbs * m, dtype=np.uint8)
        byte[pairs[:, 0]], byte[pairs[:, 1]] = np.arange(len(pairs)), np.arange(len(pairs))
        shift[pairs[:, 1]] = 4
        _LAYOUTS[key] = byte.reshape(bbs, m), shift.reshape(bbs, m), pairs
    return _LAYOUTS[key]


def _pack(nibbles: np.ndarray, layout: tuple, bbs: int, block: int) -> np.ndarray:
    """(n, M) nibbles in FAISS's blocks of bbs codes (the last one padded with zeros)."""
    pairs = layout[2]
    blocks = -(-len(nibbles) // bbs)
    flat = np.zeros((blocks * bbs, nibbles.shape[1]), dtype=np.uint8)
    flat[: len(nibbles)] = nibbles
    flat = flat.reshape(blocks, -1)
    return np.ascontiguousarray(flat[:, pairs[:, 0]] | (flat[:, pairs[:, 1]] << 4)).reshape(-1)
