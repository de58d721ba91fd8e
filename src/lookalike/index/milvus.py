"""Milvus as the vector index: a Milvus server (`milvus://host:19530`) or Milvus Lite, embedded in
this process (`milvus:///path/lite.db`). Milvus holds image ids and vectors only; records, metadata
and the filter terms stay in SQLite, which resolves a filter to image ids that are passed to Milvus
as an `id in [...]` expression, so a metadata edit never has to reach Milvus and a filter means the
same on every backend.

A collection is what `compact.py` calls a snapshot: `save(tag, note)` flushes it and records in
`milvus-<tag>.json`, beside the database, which collection holds the vectors of that space and the
catalog position they are caught up to. A new space (a projection refit, a rebuild) gets a new
collection; the one it supersedes is dropped when the new one is saved.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import uuid
import warnings
from pathlib import Path

import numpy as np

from lookalike.errors import LookalikeError
from lookalike.files import replace_atomically

log = logging.getLogger("lookalike")
TOKEN_ENV = "LOOKALIKE_MILVUS_TOKEN"  # a server's token ("user:password" or an API key): never on a command line
INSERT_BATCH = 200  # rows per upsert call: 4,200 rows/s into Milvus Lite at 1280 dims (2,000: 107 rows/s)
FILTER_IDS = 16_384  # ids per `id in [...]` expression; more are searched in several calls and merged
# what `index_type` builds and how it is searched, given k and the share of the collection a filter
# lets through; "auto" (the default), by measurement (BENCHMARKS.md "Scaling out"): FLAT on Milvus
# Lite, which builds none of the approximate indexes it is asked for (it searches its own interim
# index, whatever nlist or nprobe say: recall@10 0.59 at 100k vectors; FLAT is exact, p50 ~35-50 ms
# at 100k), IVF_FLAT on a server (nlist 1,024; 128 lists probed: recall@10 0.95 for shopper photos at
# 100k on a Milvus 2.3 server, 0.86 at 64). A filter leaves fewer vectors in each list: as many more
# lists are probed (all of them for a filter that passes 1 in 8), so a filter costs no recall.
IVF_PROBES = 128
INDEXES = {
    "IVF_FLAT": ({"nlist": 1024}, lambda k, share: {"nprobe": min(1024, math.ceil(IVF_PROBES / share))}),
    "HNSW": ({"M": 16, "efConstruction": 200}, lambda k, share: {"ef": min(4096, math.ceil(max(128, k) / share))}),
    "FLAT": ({}, lambda k, share: {}),
}
_SERVER = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$")


def address(spec: str) -> tuple[str, bool]:
    """The MilvusClient uri of a store address, and whether it is Milvus Lite. `milvus:///abs/x.db`
    (three slashes: a local file) is Lite; `milvus://host[:port]` a server (http; `milvuss://` https)."""
    scheme, _, rest = spec.partition("://")
    if scheme not in ("milvus", "milvuss") or not rest:
        raise LookalikeError(f"store {spec!r}: expected milvus:///path/to/lite.db or milvus://host:19530")
    if rest.startswith("/"):
        if scheme != "milvus" or not rest.endswith(".db"):
            raise LookalikeError(f"store {spec!r}: a Milvus Lite file is named milvus:///path/to/file.db")
        return rest, True
    if "@" in rest:
        raise LookalikeError(f"store {spec!r}: give no credentials in the address; set {TOKEN_ENV} instead")
    if not _SERVER.match(rest):
        raise LookalikeError(f"store {spec!r}: expected milvus://host:port (e.g. milvus://localhost:19530)")
    host_port = rest if ":" in rest else f"{rest}:19530"
    return f"{'https' if scheme == 'milvuss' else 'http'}://{host_port}", False


def client(spec: str):
    """A MilvusClient for a store address (one per process and address: Lite runs one server per file)."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise LookalikeError("the milvus store needs pymilvus: pip install 'lookalike[milvus]'") from None
    for name in ("pymilvus", "pymilvus.milvus_client"):  # its log repeats, as tracebacks, what our one line says
        logging.getLogger(name).setLevel(logging.CRITICAL)
    uri, lite = address(spec)
    if lite:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    key = (uri, os.environ.get(TOKEN_ENV, ""))
    if key not in _CLIENTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # milvus-lite imports pkg_resources
                warnings.simplefilter("ignore", UserWarning)
                made = MilvusClient(uri=uri, token=key[1]) if key[1] else MilvusClient(uri=uri)
        except Exception as e:  # pymilvus raises its own and gRPC errors: say which store and why
            hint = " (Milvus Lite serves one process at a time: use a Milvus server for several)" if lite else ""
            raise LookalikeError(f"store {spec}: cannot connect to Milvus ({_reason(e)}){hint}") from None
        _CLIENTS[key] = [made, 0]
    _CLIENTS[key][1] += 1
    return key, _CLIENTS[key][0]


def release(key: tuple[str, str]) -> None:
    """One user fewer of a client; the last one closes it (for Milvus Lite: its server stops, and
    another process may open the file)."""
    entry = _CLIENTS.get(key)
    if entry is not None:
        entry[1] -= 1
        if entry[1] <= 0:
            del _CLIENTS[key]
            entry[0].close()
            if not key[0].startswith(("http://", "https://")):  # Milvus Lite: stop the server it ran for the file
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(key[0])


_CLIENTS: dict[tuple[str, str], list] = {}  # (uri, token) -> [MilvusClient, users]


def milvus(directory: Path, dim: int, expected: int, tag: str | None, address: str = "",
           index_type: str = "auto", **_) -> MilvusIndex:  # fmt: skip
    return MilvusIndex(directory, dim, tag, address, _index_type(index_type, address))


def kind_for(expected: int, index_type: str = "auto", address: str = "", **_) -> str:
    return f"milvus-{_index_type(index_type, address).lower()}"


def _index_type(index_type: str, spec: str) -> str:
    if index_type == "auto":
        return "FLAT" if spec.startswith("milvus:///") else "IVF_FLAT"
    return index_type


milvus.kind_for = kind_for


class MilvusIndex:
    """Vectors by image id in a Milvus collection (inner product over unit vectors)."""

    def __init__(self, directory: Path, dim: int, tag: str | None, spec: str, index_type: str = "FLAT"):
        if index_type not in INDEXES:
            raise LookalikeError(f"milvus index_type {index_type!r}: expected one of {', '.join(INDEXES)}")
        self.directory, self.spec, self.dim, self.index_type = Path(directory), spec, dim, index_type
        self.kind = kind_for(0, index_type)
        self._client_key, self.client = client(spec)
        self.restored: dict | None = None
        self.damaged: str | None = None
        self._count: int | None = None
        # Searches are "Session" consistent: they see every write of this client (Strong makes each one
        # wait for the server's next time tick: 200-400 ms a search on a Milvus 2.3 server). The first
        # search is Strong (what other processes wrote before this one opened), and so is the first
        # after a delete (a 2.3 server leaves deletes out of the session's timestamp).
        self._strong_next = True
        saved = self._manifest(tag) if tag is not None else None
        if saved is not None and saved.get("dim") == dim and self._exists(saved["collection"]):
            self.collection, self.restored = saved["collection"], saved["note"]
            self._call(self.client.load_collection, self.collection)
        else:
            if saved is not None:
                self.damaged = f"Milvus collection {saved['collection']} of {spec} is gone or of another size"
            self.collection = f"lookalike_{uuid.uuid4().hex[:16]}"
            self._create()

    # -- the collection -----------------------------------------------------------------------
    def _create(self) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        params = self.client.prepare_index_params()
        params.add_index("vector", index_type=self.index_type, metric_type="IP", params=INDEXES[self.index_type][0])
        self._call(self.client.create_collection, self.collection, schema=schema, index_params=params,
                   consistency_level="Strong")  # fmt: skip  # a write is seen by the next search

    def _exists(self, name: str) -> bool:
        return bool(self._call(self.client.has_collection, name))

    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as e:
            raise LookalikeError(f"store {self.spec}: Milvus {method.__name__} failed ({_reason(e)})") from None

    # -- the interface ------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        for start in range(0, len(ids), INSERT_BATCH):
            end = start + INSERT_BATCH
            rows = [{"id": int(i), "vector": v} for i, v in zip(ids[start:end], vectors[start:end], strict=True)]
            self._call(self.client.upsert, self.collection, rows)  # upsert: a catch-up may replay ids
        self._count = None

    def remove(self, ids: np.ndarray) -> None:
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64)]
        for start in range(0, len(ids), FILTER_IDS):
            self._call(self.client.delete, self.collection, ids=ids[start : start + FILTER_IDS])
        self._count = None
        self._strong_next = True

    def search(self, vector: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        share = 1.0 if allowed is None else min(1.0, max(len(allowed), 1) / max(self.count(), 1))
        params = {"metric_type": "IP", "params": INDEXES[self.index_type][1](k, share)}
        level, self._strong_next = ("Strong" if self._strong_next else "Session"), False
        query = [np.asarray(vector, dtype=np.float32).reshape(-1).tolist()]
        filters = [None] if allowed is None else [
            f"id in [{','.join(map(str, allowed[s : s + FILTER_IDS].tolist()))}]"
            for s in range(0, len(allowed), FILTER_IDS)
        ]  # fmt: skip
        hits: list[tuple[float, int]] = []
        for expression in filters:
            kwargs = {"filter": expression} if expression else {}
            found = self._call(self.client.search, self.collection, data=query, limit=k, search_params=params,
                               output_fields=[], consistency_level=level, **kwargs)  # fmt: skip
            hits += [(float(h["distance"]), int(h["id"])) for h in found[0]]
        hits = sorted(hits, key=lambda h: (-h[0], h[1]))[:k]
        return np.array([i for _, i in hits], dtype=np.int64), np.array([s for s, _ in hits], dtype=np.float32)

    def count(self) -> int:
        if self._count is None:
            rows = self._call(self.client.query, self.collection, filter="", output_fields=["count(*)"],
                              consistency_level="Session")  # fmt: skip
            self._count = int(rows[0]["count(*)"])
        return self._count

    def save(self, tag: str, note: dict) -> None:
        """Flush (Milvus persists what was written), then name this collection as the snapshot of
        `tag` caught up to `note`, and drop the collections it supersedes."""
        self._call(self.client.flush, self.collection)
        previous = {m.name: json.loads(m.read_text()) for m in self.directory.glob("milvus-*.json")}
        target = self.directory / f"milvus-{tag}.json"
        manifest = {"format": 1, "store": self.spec, "collection": self.collection, "dim": self.dim, "note": note}
        replace_atomically(target, json.dumps(manifest).encode())
        for name, old in previous.items():
            if old.get("collection") != self.collection:
                if old.get("store") == self.spec and self._exists(old["collection"]):
                    self._call(self.client.drop_collection, old["collection"])
                if name != target.name:
                    (self.directory / name).unlink(missing_ok=True)

    def drop(self) -> None:
        """Forget everything this store holds for the catalog (after a migration away from it)."""
        for m in self.directory.glob("milvus-*.json"):
            old = json.loads(m.read_text())
            if old.get("store") == self.spec and self._exists(old["collection"]):
                self._call(self.client.drop_collection, old["collection"])
            m.unlink()
        if self._exists(self.collection):
            self._call(self.client.drop_collection, self.collection)

    def close(self) -> None:
        if self._client_key is not None:
            release(self._client_key)
            self._client_key = None

    def _manifest(self, tag: str) -> dict | None:
        path = self.directory / f"milvus-{tag}.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return manifest if manifest.get("store") == self.spec else None


def _reason(e: Exception) -> str:
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    return text.strip().splitlines()[0][:300]
