"""A catalog's storage: SQLite records are the truth, a VectorIndex backend (FAISS by default, exact or
HNSW) the index."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from lookalike.errors import LookalikeError
from lookalike.records import DB_NAME, SCHEMA_VERSION, ImageRecord
from lookalike.storage import Storage


def unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def records(vectors, products, meta=None):
    return [
        ImageRecord(p, f"/img/{p}/{i}.jpg", f"sha{i}", v, "detector", None, (meta or {}).get(p, {}))
        for i, (v, p) in enumerate(zip(vectors, products, strict=True))
    ]


def test_add_search_remove_persist(tmp_path):
    rng = np.random.default_rng(0)
    vecs = unit(rng.normal(size=(20, 16)))
    products = [f"p{i % 5}" for i in range(20)]
    store = Storage(tmp_path)
    store.records.add(
        records(vecs, products, {"p1": {"brand": "Nike"}, "p2": {"brand": "nike"}, "p3": {"brand": "Vans"}})
    )
    assert store.records.count() == (5, 20)
    hits = store.search(vecs[7], 3)
    assert hits[0].image == "/img/p2/7.jpg" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    nike = store.search(vecs[3], 20, where={"brand": "NIKE"})
    assert {h.product_id for h in nike} == {"p1", "p2"} and len(nike) == 8
    assert store.search(vecs[3], 5, where={"brand": "Puma"}) == []

    assert len(store.records.remove(products=["p2"])) == 4
    assert store.records.count() == (4, 16)
    assert all(h.product_id != "p2" for h in store.search(vecs[7], 20))
    # replacing an image keeps one row for it
    store.records.add([ImageRecord("p1", "/img/p1/1.jpg", "new", vecs[0], "whole", None, {})])
    assert store.records.count() == (4, 16)
    assert store.records.known()[("p1", "/img/p1/1.jpg")][0] == "new"
    store.close()

    reopened = Storage(tmp_path)
    assert reopened.records.count() == (4, 16) and reopened.records.dim == 16
    assert reopened.search(vecs[0], 2)[0].score == pytest.approx(1.0, abs=1e-5)


def test_an_empty_catalog_can_be_searched_then_filled(tmp_path):
    store = Storage(tmp_path)
    assert store.search(unit(np.ones(8)), 3) == [] and store.live.kind() == "exact"  # before any vector
    store.records.add(records(unit(np.eye(8)[:3] + 0.1), ["a", "b", "c"]))
    assert store.search(unit(np.eye(8)[1] + 0.1), 1)[0].product_id == "b"


def test_dimension_is_enforced(tmp_path):
    store = Storage(tmp_path)
    store.records.add(records(unit(np.ones((1, 8))), ["a"]))
    with pytest.raises(LookalikeError, match="vector size"):
        store.records.add(records(unit(np.ones((1, 4))), ["b"]))
    assert store.records.count() == (1, 1)


def test_newer_schema_is_refused(tmp_path):
    Storage(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(LookalikeError, match="newer"):
        Storage(tmp_path)


def test_not_a_database(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"garbage" * 100)
    with pytest.raises(LookalikeError, match="not a readable catalog"):
        Storage(tmp_path)


def test_hnsw_recall_against_exact(tmp_path):
    """Clustered vectors, like shoe embeddings: HNSW must keep recall@10 >= 0.98 against exact."""
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(200, 64))
    data = unit(centers[rng.integers(0, 200, 6000)] + 0.35 * rng.normal(size=(6000, 64)))
    queries = unit(centers[rng.integers(0, 200, 200)] + 0.35 * rng.normal(size=(200, 64)))
    products = [f"p{i}" for i in range(len(data))]
    exact = Storage(tmp_path / "exact", large_from=10**9)
    hnsw = Storage(tmp_path / "hnsw", large_from=1000, large="hnsw")
    for s in (exact, hnsw):
        s.records.add(records(data, products))
    assert exact.live.kind() == "exact" and hnsw.live.kind() == "hnsw"
    recall = np.mean(
        [len({h.image for h in exact.search(q, 10)} & {h.image for h in hnsw.search(q, 10)}) / 10 for q in queries]
    )
    assert recall >= 0.98
    hnsw.live.flush()
    assert len(list((tmp_path / "hnsw").glob("index-*.faiss"))) == 1
    again = Storage(tmp_path / "hnsw", large_from=1000, large="hnsw")
    assert [h.image for h in again.search(queries[0], 10)] == [h.image for h in hnsw.search(queries[0], 10)]
    # HNSW cannot delete in place: a removed image is filtered out at once, without a rebuild
    index = hnsw.live.index()
    top = hnsw.search(queries[0], 1)[0]
    hnsw.records.remove(images=[(top.product_id, top.image)])
    assert hnsw.live.index() is index and index.count() == len(data) - 1
    assert top.image not in {h.image for h in hnsw.search(queries[0], 10)}
    assert len(hnsw.search(queries[0], 10, where=None)) == 10


def test_migrates_a_version_1_catalog(tmp_path):
    from lookalike.records import MIGRATIONS

    db = sqlite3.connect(tmp_path / DB_NAME)
    for stmt in MIGRATIONS[1]:
        db.execute(stmt)
    db.execute("INSERT INTO products VALUES ('p', '{}')")
    db.execute(
        "INSERT INTO images(product_id, image, sha256, vector, crop) VALUES ('p', 'a.jpg', 's', ?, 'whole')",
        (unit(np.ones((1, 4)))[0].tobytes(),),
    )
    db.execute("INSERT INTO meta VALUES ('dim', '4')")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = Storage(tmp_path)
    assert store.records.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    assert store.records.count() == (1, 1)
    assert store.search(unit(np.ones(4)), 1)[0].image == str(tmp_path.resolve() / "a.jpg")  # relative = in the catalog


def test_v3_migration_makes_uploads_catalog_relative(tmp_path):
    """Catalogs made before v3 stored uploads by the server's working directory (point 5 of issue 9):
    after the migration they are found from anywhere, and belong to the API."""
    from lookalike.records import MIGRATIONS

    sha = "ab" + "0" * 62
    db = sqlite3.connect(tmp_path / DB_NAME)
    for v in (1, 2):
        for stmt in MIGRATIONS[v]:
            db.execute(stmt)
    db.execute("INSERT INTO products VALUES ('p', '{}'), ('q', '{}')")
    vector = unit(np.ones((1, 4)))[0].tobytes()
    for pid, image in (("p", f"catalogs/shop/uploads/ab/{sha}"), ("q", "/data/shoes/q.jpg")):
        db.execute("INSERT INTO images(product_id, image, sha256, vector, crop) VALUES (?, ?, 's', ?, 'whole')",
                   (pid, image, vector))  # fmt: skip
    db.execute("INSERT INTO meta VALUES ('dim', '4')")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    store = Storage(tmp_path)
    assert store.records.product("p")[1] == [str(tmp_path.resolve() / "uploads" / "ab" / sha)]
    assert store.records.product("q")[1] == ["/data/shoes/q.jpg"]
    assert store.records.known()[("p", str(tmp_path.resolve() / "uploads" / "ab" / sha))][1] == "api"
    assert store.records.known()[("q", "/data/shoes/q.jpg")][1] is None  # legacy: owned by whichever source lists it


def test_learned_projection_applies_to_index_and_queries(tmp_path):
    from lookalike.embed import Whitening

    rng = np.random.default_rng(3)
    vecs = unit(rng.normal(size=(300, 32)) * np.linspace(3, 0.1, 32))  # strongly anisotropic
    store = Storage(tmp_path)
    store.records.add(records(vecs, [f"p{i}" for i in range(300)]))
    raw_top = [h.image for h in store.search(vecs[5], 5)]
    whitening = Whitening.fit(store.records.vectors(), 8, power=0.5)
    store.records.set_projection((whitening.mean, whitening.matrix))
    store.live.set_transform(whitening)  # stored vectors and queries are mapped alike
    assert store.live.index().index.d == 8
    hits = store.search(vecs[5], 5)
    assert hits[0].image == raw_top[0] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    store.records.add(records(vecs[:1] * -1, ["new"]))  # added after: mapped on the way in
    assert store.search(-vecs[0], 1)[0].product_id == "new"
    store.close()
    again = Storage(tmp_path)  # the projection persists
    version, arrays = again.records.projection()
    assert version is not None and np.array_equal(arrays[1], whitening.matrix)
    again.records.set_projection(None)
    assert again.records.projection()[1] is None and again.records.projection()[0] != version


class BruteForce:
    """A second backend written the way a new one would be: the interface and nothing else."""

    kind = "numpy"
    restored = None  # saves nothing: the catalog fills it from SQLite on every open

    def __init__(self, directory, dim, expected, tag):
        self.ids, self.vectors = np.zeros(0, np.int64), np.zeros((0, dim), np.float32)

    def add(self, ids, vectors):
        self.ids, self.vectors = np.concatenate([self.ids, ids]), np.concatenate([self.vectors, vectors])

    def remove(self, ids):
        keep = ~np.isin(self.ids, ids)
        self.ids, self.vectors = self.ids[keep], self.vectors[keep]

    def search(self, vector, k, allowed=None):
        scores = self.vectors @ vector.ravel()
        if allowed is not None:
            scores = np.where(np.isin(self.ids, allowed), scores, -np.inf)
        order = [i for i in np.argsort(-scores)[:k] if np.isfinite(scores[i])]
        return self.ids[order], scores[order]

    def count(self):
        return len(self.ids)

    def save(self, tag, note):
        pass

    def close(self):
        pass


def test_a_second_backend_is_one_registry_entry(tmp_path, monkeypatch):
    from lookalike.index import BACKENDS

    monkeypatch.setitem(BACKENDS, "numpy", f"{__name__}:BruteForce")
    rng = np.random.default_rng(4)
    vecs = unit(rng.normal(size=(30, 8)))
    products = [f"p{i % 6}" for i in range(30)]
    meta = {"p1": {"brand": "nike"}}
    store, reference = Storage(tmp_path / "a", store="numpy"), Storage(tmp_path / "b")
    for s in (store, reference):
        s.records.add(records(vecs, products, meta))
        s.records.remove(products=["p2"])
    assert store.live.kind() == "numpy" and reference.live.kind() == "exact"
    for q in vecs[:5]:
        assert [h.image for h in store.search(q, 7)] == [h.image for h in reference.search(q, 7)]
        assert [h.image for h in store.search(q, 7, {"brand": "NIKE"})] == [
            h.image for h in reference.search(q, 7, {"brand": "NIKE"})
        ]
    from lookalike import Catalog

    with pytest.raises(LookalikeError, match="store 'nope': expected local, numpy, milvus"):
        Catalog.open(tmp_path / "c", create=True, store="nope")
    assert not (tmp_path / "c").exists()


def test_a_catalog_keeps_the_backend_it_was_made_with(tmp_path, monkeypatch):
    from test_config import _tiny

    from lookalike import Catalog
    from lookalike.index import BACKENDS

    monkeypatch.setitem(BACKENDS, "numpy", f"{__name__}:BruteForce")
    config, items = _tiny(tmp_path)
    with Catalog.open(tmp_path / "cat", config=config, create=True, store="numpy") as cat:
        cat.index(items)
        assert cat.info()["index"] == "numpy"
    with Catalog.open(tmp_path / "cat") as cat:  # recorded in the catalog: no need to say it again
        assert cat.info()["index"] == "numpy"
        assert cat.search(tmp_path / "green.png", k=1).results[0].product_id == "green"
    with pytest.raises(LookalikeError, match="keeps its vectors in 'numpy', not 'local'"):
        Catalog.open(tmp_path / "cat", store="local")
