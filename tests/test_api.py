"""The REST API with FastAPI's test client, on a real catalog with the real models."""

from __future__ import annotations

import shutil
import threading
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from lookalike import Catalog
from lookalike.api import ApiSettings, create_app
from lookalike.api.settings import API_LIMITS

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def api_catalog(tmp_path_factory, branded_catalog):
    """A writable copy of the branded catalog (6 products, 18 images, brand/price/url metadata)."""
    target = tmp_path_factory.mktemp("api") / "cat"
    shutil.copytree(branded_catalog, target)
    return target


@pytest.fixture(scope="module")
def client(api_catalog):
    with TestClient(
        create_app(api_catalog, ApiSettings(token=TOKEN, limits=replace(API_LIMITS, max_bytes=2_000_000)))
    ) as c:
        yield c


def first_image(catalog) -> tuple[str, bytes]:
    with Catalog.open(catalog) as cat:
        product_id, image = cat.examples(1)[0]
    return product_id, open(image, "rb").read()


def test_health_stats_and_schema(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["products"] == 6 and health["images"] == 18
    schema = client.get("/openapi.json").json()
    assert {"/search", "/products", "/products/{product_id}", "/health", "/stats"} <= set(schema["paths"])
    for path in ("/search", "/products"):  # one operation, two bodies (a form route and a JSON route)
        assert set(schema["paths"][path]["post"]["requestBody"]["content"]) == {
            "multipart/form-data",
            "application/json",
        }
    assert client.post("/products", content=b"x", headers={"content-type": "text/plain", **AUTH}).status_code == 415
    assert client.get("/search").status_code == 405 and client.get("/search").headers["allow"] == "POST"
    assert client.get("/docs").status_code == 200


def test_search_upload_same_json_as_the_cli(client, api_catalog):
    product_id, data = first_image(api_catalog)
    r = client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"query", "no_match", "threshold", "results", "search_id"} and len(body["results"]) == 3
    assert body["search_id"] is None  # the search log is off unless the shop turns it on
    assert body["no_match"] is False
    assert body["results"][0]["product_id"] == product_id
    assert set(body["results"][0]) == {"product_id", "score", "image", "metadata"}
    assert body["results"][0]["metadata"]["brand"] in ("Nike", "Vans")
    filtered = client.post("/search", files={"image": ("q.jpg", data)}, data={"k": "10", "where": '{"brand": "Nike"}'})
    assert {m["metadata"]["brand"] for m in filtered.json()["results"]} == {"Nike"}
    by_brand = client.post("/search", files={"image": ("q.jpg", data)}, data={"k": "5", "collapse": "brand"}).json()
    assert [m["metadata"]["brand"] for m in by_brand["results"]] in (["Nike", "Vans"], ["Vans", "Nike"])
    as_json = client.post("/search", json={"url": "http://127.0.0.1/x.jpg", "collapse": ""})
    assert as_json.status_code == 422 and "collapse" in as_json.text
    whole = client.post("/search", files={"image": ("q.jpg", data)}, data={"box": "whole"}).json()
    assert whole["query"]["crop"] == "whole"
    stats = client.get("/stats").json()
    assert stats["searches"] >= 3 and stats["search_ms_p50"] > 0


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        ({"files": {"image": ("q.jpg", b"not an image")}}, 400, "not an image"),
        ({"files": {"image": ("q.jpg", b"")}}, 400, "empty"),
        ({"files": {"image": ("q.jpg", b"x" * 2_000_001)}}, 413, "limit"),
        ({"files": {"image": ("q.jpg", b"x")}, "data": {"k": "0"}}, 422, "k"),
        ({"files": {"image": ("q.jpg", b"x")}, "data": {"k": "101"}}, 422, "k"),
        ({"files": {"image": ("q.jpg", b"x")}, "data": {"k": "ten"}}, 422, "k"),
        ({"files": {"image": ("q.jpg", b"x")}, "data": {"where": "[1]"}}, 422, "where"),
        ({"data": {"k": "3"}}, 422, "image"),
        ({"json": {"url": "http://127.0.0.1/x.jpg"}}, 400, "non-public"),
        ({"json": {"url": "http://169.254.169.254/latest"}}, 400, "non-public"),
        ({"json": {"url": "file:///etc/passwd"}}, 422, "only http"),
        ({"json": {"url": "/etc/passwd"}}, 422, "only http"),
        ({"json": {"url": "https://x.example/a.jpg", "k": 500}}, 422, "k"),
        ({"json": {"url": "https://x.example/a.jpg", "extra": 1}}, 422, "extra"),
        ({"content": b"{broken", "headers": {"content-type": "application/json"}}, 400, "JSON"),
        ({"content": b"raw", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
    ],
)
def test_bad_requests_get_a_json_error(client, kwargs, status, words):
    r = client.post("/search", **kwargs)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"].lower()


def test_bad_box(client, api_catalog):
    _, data = first_image(api_catalog)
    r = client.post("/search", files={"image": ("q.jpg", data)}, data={"box": "42"})
    assert r.status_code == 400 and "box 42 does not exist" in r.json()["error"]
    r = client.post("/search", files={"image": ("q.jpg", data)}, data={"box": "1,2,3"})
    assert r.status_code == 400 and "x1,y1,x2,y2" in r.json()["error"]


def test_products_read(client, api_catalog):
    product_id, data = first_image(api_catalog)
    p = client.get(f"/products/{product_id}").json()
    assert p["product_id"] == product_id and len(p["images"]) == 3 and p["metadata"]["url"].startswith("https://")
    img = client.get(p["images"][0]["href"])
    assert img.status_code == 200 and img.content[:2] == b"\xff\xd8"
    assert client.get(f"/products/{product_id}/image/9").status_code == 404
    assert client.get("/products/nope").json()["error"] == "no product 'nope'"


def test_writes_need_the_token(client, api_catalog):
    _, data = first_image(api_catalog)
    form = {"data": {"product_id": "new-shoe", "metadata": '{"brand": "Acme"}'}, "files": [("images", ("a.jpg", data))]}
    assert client.post("/products", **form).status_code == 401
    assert client.post("/products", headers={"Authorization": "Bearer wrong"}, **form).status_code == 401
    r = client.post("/products", headers=AUTH, **form)
    assert r.status_code == 201, r.text
    assert r.json()["metadata"] == {"brand": "Acme"} and len(r.json()["images"]) == 1
    # visible to the next search, with no restart
    hit = client.post("/search", files={"image": ("q.jpg", data)}, data={"k": "2"}).json()["results"]
    assert "new-shoe" in [m["product_id"] for m in hit]
    assert client.delete("/products/new-shoe").status_code == 401
    assert client.delete("/products/new-shoe", headers=AUTH).json()["removed_images"] == 1
    assert client.get("/products/new-shoe").status_code == 404
    assert client.delete("/products/new-shoe", headers=AUTH).status_code == 404
    bad = client.post("/products", headers=AUTH, data={"product_id": "x"}, files=[("images", ("a.jpg", b"nope"))])
    assert bad.status_code == 400 and "not an image" in bad.json()["error"]
    assert client.get("/products/x").status_code == 404  # nothing half-written
    refused = client.post("/products", headers=AUTH, json={"product_id": "y", "image_urls": ["http://10.0.0.1/a.jpg"]})
    assert refused.status_code == 400 and "non-public" in refused.json()["error"]


def test_writes_off_without_token_and_protected_reads(api_catalog):
    with TestClient(create_app(api_catalog, ApiSettings(token=None))) as c:
        r = c.delete("/products/anything", headers=AUTH)
        assert r.status_code == 403 and "LOOKALIKE_API_TOKEN" in r.json()["error"]
    with TestClient(create_app(api_catalog, ApiSettings(token=TOKEN, protect_reads=True))) as c:
        assert c.get("/stats").status_code == 401
        assert c.get("/stats", headers=AUTH).status_code == 200
        assert c.get("/health").status_code == 200  # health stays open for probes


def test_searches_never_see_a_half_written_product(client, api_catalog):
    """A product is replaced over and over while other threads search and read it."""
    with Catalog.open(api_catalog) as cat:
        pairs = cat.examples(6)
    version_a = [open(img, "rb").read() for _, img in pairs[:3]]
    version_b = [open(img, "rb").read() for _, img in pairs[3:5]]

    def put(version: list[bytes], tag: str):
        files = [("images", (f"{n}.jpg", d)) for n, d in enumerate(version)]
        r = client.post("/products", headers=AUTH, data={"product_id": "flip", "metadata": f'{{"v": "{tag}"}}'},
                        files=files)  # fmt: skip
        assert r.status_code == 201

    put(version_a, "A")
    errors: list[str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            p = client.get("/products/flip").json()
            expected = {"A": 3, "B": 2}[p["metadata"]["v"]]
            if len(p["images"]) != expected:
                errors.append(f"mixed product: {p}")
            r = client.post("/search", files={"image": ("q.jpg", version_b[0])}, data={"k": "10"})
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for n in range(6):
        put(version_b if n % 2 == 0 else version_a, "B" if n % 2 == 0 else "A")
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
