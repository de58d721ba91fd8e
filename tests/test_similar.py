"""More like this (issue 15): a catalog product's stored vectors as the query, through the Python API,
the CLI and a real server on loopback. No photo is read and nothing is re-embedded."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import start_api_server, stop_server

from lookalike import Catalog
from lookalike.errors import LookalikeError


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lookalike.cli", *args], capture_output=True, text=True, timeout=300)


def test_more_like_this_everywhere(branded_catalog, tmp_path):
    with Catalog.open(branded_catalog) as cat:
        product = cat.examples(6)[2][0]
        found = cat.similar(product, k=3)
        everyone = cat.similar(product, k=10)
        nike = cat.similar(product, k=10, where={"brand": "nike"})
        # the same as searching with the mean of its stored vectors by hand, less the product itself
        stored = cat.records.product_vectors(product)
        assert len(stored) == len(cat.product(product)["images"]) == 3
        by_hand = [m.product_id for m in cat.search_vector(stored.mean(0) / np.linalg.norm(stored.mean(0)), k=6)]
        with pytest.raises(LookalikeError, match="no product 'nope'"):
            cat.similar("nope")
    ids = [m.product_id for m in found.results]
    assert len(ids) == 3 and product not in ids and found.query.crop == f"product {product}"
    assert [m.product_id for m in everyone.results] == [p for p in by_hand if p != product][:10]
    assert len(everyone.results) == 5  # every other product, best first
    assert [m.score for m in everyone.results] == sorted((m.score for m in everyone.results), reverse=True)
    assert nike.results and all(m.metadata["brand"] == "Nike" for m in nike.results)

    done = cli("search", "--product", product, "--catalog", str(branded_catalog), "-k", "3", "--json")
    assert done.returncode == 0, done.stderr
    assert [r["product_id"] for r in json.loads(done.stdout)["results"]] == ids
    both = cli("search", str(tmp_path / "x.jpg"), "--product", product, "--catalog", str(branded_catalog))
    assert both.returncode == 2 and "give a photo (IMAGE) or --product ID, one of the two" in both.stderr

    proc, url = start_api_server(branded_catalog, tmp_path / "server.log")
    try:
        r = httpx.get(f"{url}/products/{product}/similar", params={"k": 3}, timeout=60)
        assert r.status_code == 200 and [m["product_id"] for m in r.json()["results"]] == ids
        r = httpx.get(f"{url}/products/{product}/similar", params={"where": "brand=nike"}, timeout=60)
        assert [m["product_id"] for m in r.json()["results"]] == [m.product_id for m in nike.results]
        assert httpx.get(f"{url}/products/nope/similar", timeout=60).status_code == 404
        r = httpx.get(f"{url}/products/{product}/similar", params={"where": "brand"}, timeout=60)
        assert r.status_code == 422 and "where" in r.json()["error"]
    finally:
        stop_server(proc)


def test_a_shops_own_manifest_columns(tmp_path, sneaker_folder):
    """Issue 15: `index --id-column/--image-column/--metadata-column`, so a shop's CSV works as it is;
    a column that is not there is refused by name before any image is read."""
    products = sorted(sneaker_folder.iterdir())[:2]
    lines = ["sku,photo,name,internal_note"]
    for n, product in enumerate(products):
        for photo in sorted(product.glob("*.jpg"))[:2]:
            lines.append(f"SKU-{n},{photo},Shoe {n},do not show")
    manifest = tmp_path / "shop.csv"
    manifest.write_text("\n".join(lines) + "\n")
    catalog = tmp_path / "cat"
    done = cli("index", str(manifest), "--catalog", str(catalog), "--id-column", "sku", "--image-column", "photo",
               "--metadata-column", "name", "-q")  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Catalog.open(catalog) as cat:
        assert cat.info()["products"] == 2 and cat.info()["images"] == 4
        assert cat.product("SKU-1")["metadata"] == {"name": "Shoe 1"}  # only the column asked for
        photo = sorted(products[1].glob("*.jpg"))[0]
        assert cat.search(photo, k=1).results[0].product_id == "SKU-1"
    wrong = cli("index", str(manifest), "--catalog", str(tmp_path / "other"), "--image-column", "picture")
    assert wrong.returncode == 2
    assert "no column 'product_id' (it has 'sku', 'photo', 'name', 'internal_note')" in wrong.stderr
    assert "--id-column" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


def test_info_lists_products_with_near_identical_photos(tmp_path, branded_catalog):
    """Issue 15: `info --duplicates`: one photo filed under two products (here re-encoded smaller, as a
    shop's second upload would be) is found; distinct products are not."""
    import io
    import shutil

    from PIL import Image

    catalog = tmp_path / "cat"
    shutil.copytree(branded_catalog, catalog)
    with Catalog.open(catalog) as cat:
        original, photo = cat.examples(6)[4]
        with Image.open(photo) as img:
            copy = io.BytesIO()
            img.convert("RGB").resize((img.width * 9 // 10, img.height * 9 // 10)).save(copy, "JPEG", quality=80)
        cat.add_product("dup", [copy.getvalue()], {"brand": "Other"})
    done = cli("info", "--catalog", str(catalog), "--duplicates", "--json")
    assert done.returncode == 0, done.stderr
    pairs = json.loads(done.stdout)["duplicates"]
    assert pairs and all("dup" in p["products"] for p in pairs)
    assert pairs[0]["products"] == sorted(["dup", original]) and pairs[0]["score"] >= 0.94
    assert photo in pairs[0]["images"]
    text = cli("info", "--catalog", str(catalog), "--duplicates", "--threshold", "1.01").stdout
    assert "near-duplicate photos of different products (score >= 1.01): 0" in text
