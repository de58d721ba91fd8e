"""Issue 26: a shop's feed as it is. Feeds made here (Merchant Center TSV and XML, Shopify exports of
both column generations, one-row-per-image manifests), read as `index` reads them; a real loopback
server for the fetch pool (retries honouring Retry-After, conditional re-fetches, the private-address
opt-in); collapse on a real catalog."""

from __future__ import annotations

import hashlib
import http.server
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from test_hardening import cli, shoes

from lookalike import Catalog
from lookalike.errors import BadImageError, LookalikeError
from lookalike.fetching import LAG, Fetcher, FetchOptions, in_order, prefetch
from lookalike.images import Limits
from lookalike.records import DB_NAME
from lookalike.sources import Columns, Item, SourceProblem, iter_source

TRUSTED = Limits(allow_private_urls=True)


def read(path: Path, columns: Columns | None = None) -> tuple[list[Item], list[SourceProblem]]:
    out = list(iter_source(path, columns))
    return [x for x in out if isinstance(x, Item)], [x for x in out if isinstance(x, SourceProblem)]


# -- feeds read as they are ----------------------------------------------------------------------
MERCHANT_HEADER = ["id", "title", "link", "image_link", "additional_image_link", "item_group_id", "availability",
                   "price", "brand", "color", "gender", "product_type"]  # fmt: skip


def test_merchant_tsv_gives_every_image_and_the_metadata(tmp_path):
    rows = [
        MERCHANT_HEADER,
        ["RUN-1-RED", "Runner red", "https://shop.test/p/1", "https://cdn.test/1.jpg",
         'https://cdn.test/1%2Cb.jpg,"https://cdn.test/1,c.jpg", https://cdn.test/1d.jpg', "RUN-1", "in stock",
         "1,299.50 USD", "Acme", "Red/White", "unisex", "Shoes > Sneakers"],
        ["RUN-1-BLUE", "Runner blue", "https://shop.test/p/2", "https://cdn.test/2.jpg", "", "RUN-1", "out_of_stock",
         "89.00 USD", "Acme", "Blue", "unisex", "Shoes > Sneakers"],
        ["", "No id", "", "https://cdn.test/x.jpg", "", "", "in_stock", "1 USD", "", "", "", ""],
        ["NOIMG", "No image", "", "", "", "", "in_stock", "1 USD", "", "", "", ""],
        ["X" * 51, "Long id", "", "https://cdn.test/y.jpg", "", "", "in_stock", "1 USD", "", "", "", ""],
    ]  # fmt: skip
    feed = tmp_path / "feed.tsv"
    feed.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    items, problems = read(feed)
    red = [i.image for i in items if i.product_id == "RUN-1-RED"]
    assert red == ["https://cdn.test/1.jpg", "https://cdn.test/1%2Cb.jpg", "https://cdn.test/1,c.jpg",
                   "https://cdn.test/1d.jpg"]  # fmt: skip
    meta = next(i.metadata for i in items if i.product_id == "RUN-1-RED")
    assert meta["price"] == 1299.5 and meta["currency"] == "USD" and meta["availability"] == "in_stock"
    assert meta["item_group_id"] == "RUN-1" and meta["color"] == ["Red", "White"]
    assert meta["product_type"] == "Shoes > Sneakers"
    assert meta["title"] == "Runner red" and meta["link"] == "https://shop.test/p/1" and meta["brand"] == "Acme"
    assert [i.product_id for i in items].count("RUN-1-BLUE") == 1
    assert next(i.metadata for i in items if i.product_id == "RUN-1-BLUE")["color"] == "Blue"  # one: text
    reasons = sorted(p.reason for p in problems)
    assert len(reasons) == 3 and not any(p.warning for p in problems)
    assert any("no id" in r for r in reasons) and any("no image_link" in r for r in reasons)
    assert any("51 characters" in r for r in reasons)


def test_merchant_xml_rss_and_atom_with_repeated_images_and_variants(tmp_path):
    rss = tmp_path / "feed.xml"
    rss.write_text(f"""<?xml version="1.0"?>
<rss version="2.0" xmlns:g="http://base.google.com/ns/1.0"><channel><title>Shop</title>
<item><g:id>S-1</g:id><title>Sandal one</title><link>https://shop.test/s1</link>
  <g:image_link>https://cdn.test/s1.jpg</g:image_link>
  <g:additional_image_link>https://cdn.test/s1b.jpg</g:additional_image_link>
  <g:additional_image_link>https://cdn.test/s1c.jpg</g:additional_image_link>
  <g:item_group_id>S</g:item_group_id><g:price>15.00 EUR</g:price><g:availability>in_stock</g:availability></item>
<item><g:id>S-2</g:id><g:title>Sandal two</g:title><g:image_link>https://cdn.test/s2.jpg</g:image_link>
  <g:item_group_id>S</g:item_group_id><g:price>16.00 EUR</g:price></item>
<item><g:id>{"Z" * 60}</g:id><g:image_link>https://cdn.test/z.jpg</g:image_link></item>
</channel></rss>""")
    items, problems = read(rss)
    assert [(i.product_id, i.image.rsplit("/", 1)[1]) for i in items] == [
        ("S-1", "s1.jpg"), ("S-1", "s1b.jpg"), ("S-1", "s1c.jpg"), ("S-2", "s2.jpg")]  # fmt: skip
    assert items[0].metadata == {"title": "Sandal one", "link": "https://shop.test/s1", "item_group_id": "S",
                                 "price": 15.0, "currency": "EUR", "availability": "in_stock"}  # fmt: skip
    assert items[3].metadata["title"] == "Sandal two" and len(problems) == 1 and "60 characters" in problems[0].reason
    atom = tmp_path / "atom.xml"
    atom.write_text("""<?xml version="1.0"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:g="http://base.google.com/ns/1.0">
<entry><id>tag:shop,2026:1</id><g:id>A-1</g:id><title>Boot</title><link href="https://shop.test/a1"/>
  <g:image_link>https://cdn.test/a1.jpg</g:image_link></entry></feed>""")
    (boot,), _ = read(atom)
    assert boot.product_id == "A-1" and boot.metadata == {"title": "Boot", "link": "https://shop.test/a1"}
    bomb = tmp_path / "bomb.xml"
    bomb.write_text('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><rss><channel></channel></rss>')
    with pytest.raises(LookalikeError, match="DOCTYPE is refused"):
        read(bomb)


SHOPIFY_OLD = ["Handle", "Title", "Body (HTML)", "Vendor", "Type", "Option1 Name", "Option1 Value", "Variant SKU",
               "Variant Price", "Image Src", "Image Position", "Variant Image", "Status"]  # fmt: skip
SHOPIFY_NEW = ["Title", "URL handle", "Description", "Vendor", "Type", "SKU", "Option1 name", "Option1 value",
               "Price", "Product image URL", "Image position", "Variant image URL", "Status"]  # fmt: skip


@pytest.mark.parametrize("header", [SHOPIFY_OLD, SHOPIFY_NEW], ids=["old columns", "new columns"])
def test_shopify_exports_with_image_rows_variants_and_drafts(tmp_path, header):
    def row(**values: str) -> str:
        names = {"handle": ("Handle", "URL handle"), "image": ("Image Src", "Product image URL"),
                 "position": ("Image Position", "Image position"), "vimage": ("Variant Image", "Variant image URL"),
                 "oname": ("Option1 Name", "Option1 name"), "ovalue": ("Option1 Value", "Option1 value"),
                 "price": ("Variant Price", "Price"), "sku": ("Variant SKU", "SKU"), "title": ("Title",),
                 "vendor": ("Vendor",), "type": ("Type",), "status": ("Status",)}  # fmt: skip
        by_column = {c: v for k, v in values.items() for c in names[k]}
        return ",".join(f'"{by_column.get(h, "")}"' for h in header)

    lines = [
        ",".join(header),
        row(handle="runner", title="Runner, the classic", vendor="Acme", type="Sneakers", oname="Color", ovalue="Red",
            sku="R-RED", price="89.00", image="https://cdn.test/r1.jpg", position="1", status="active"),
        row(handle="runner", ovalue="Blue", sku="R-BLUE", price="89.00", vimage="https://cdn.test/r-blue.jpg"),
        row(handle="runner", image="https://cdn.test/r2.jpg", position="2"),
        row(handle="boot", title="Boot", vendor="Acme", image="https://cdn.test/b1.jpg", position="1", price="120",
            status="active"),
        row(handle="secret", title="Not yet", image="https://cdn.test/s.jpg", position="1", status="draft"),
        row(handle="old", title="Gone", image="https://cdn.test/o.jpg", position="1", status="archived"),
    ]  # fmt: skip
    export = tmp_path / "products_export.csv"
    export.write_text("\n".join(lines) + "\n")
    items, problems = read(export)
    assert [(i.product_id, i.image.rsplit("/", 1)[1]) for i in items] == [
        ("runner", "r1.jpg"), ("runner", "r2.jpg"), ("runner", "r-blue.jpg"), ("boot", "b1.jpg")]  # fmt: skip
    assert items[0].metadata == {"title": "Runner, the classic", "brand": "Acme", "product_type": "Sneakers",
                                 "price": 89.0, "color": ["Red", "Blue"], "status": "active"}  # fmt: skip
    (hidden,) = problems
    assert hidden.warning and "2 draft or archived" in hidden.reason and "secret (draft)" in hidden.reason


def test_one_row_per_image_is_a_layout_and_disagreement_is_one_short_warning(tmp_path, sneaker_folder):
    photos = [img for _, img in shoes(sneaker_folder, 2, 5)]
    lines = ["sku,photo,name,brand,price"]
    lines += [f"A,{p},Runner,Acme,50" for p in photos[:5]]  # five agreeing rows
    lines += [f"B,{photos[5]},Boot,Acme,70"] + [f"B,{p},Boot,Acme,{71 + n}" for n, p in enumerate(photos[6:])]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(lines) + "\n")
    items, problems = read(manifest, Columns("sku", "photo"))
    assert len(items) == 10 and {i.metadata["price"] for i in items if i.product_id == "B"} == {"70"}
    (warning,) = problems
    assert warning.warning and "'B'" in warning.reason and "4 of its 5 rows" in warning.reason
    assert "on price (lines 8, 9, 10 and 1 more)" in warning.reason and len(warning.reason) < 200


# -- the fetch pool --------------------------------------------------------------------------------
class ImageServer:
    """A loopback image server with validators (ETag, Last-Modified; 304 when unchanged), kept-alive
    connections, and chosen answers first: `first` maps a path to (status, Retry-After) sent once."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.first, self.log = files, {}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each body waits 40 ms for the client's delayed ACK

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                outer.log.append((time.monotonic(), name, self.headers.get("If-None-Match")))
                if name in outer.first:
                    status, wait = outer.first.pop(name)
                    self.send_response(status)
                    if wait is not None:
                        self.send_header("Retry-After", str(wait))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = outer.files.get(name)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", "Tue, 01 Dec 2026 10:00:00 GMT")
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def image_server(sneaker_folder):
    files = {f"{p}-{img.name}": img.read_bytes() for p, img in shoes(sneaker_folder, 3)}
    server = ImageServer(files)
    yield server
    server.close()


def test_fetcher_honours_retry_after_and_gives_up_with_the_status(image_server):
    name = next(iter(image_server.files))
    waits: list[float] = []
    fetcher = Fetcher(TRUSTED, FetchOptions(attempts=3, max_wait_s=30), sleep=waits.append)
    image_server.first[name] = (429, 7)
    assert fetcher.get(f"{image_server.url}/{name}").data == image_server.files[name]
    assert waits == [7.0] and fetcher.stats["retries"] == 1
    with pytest.raises(BadImageError, match=r"HTTP 404$"):  # not worth a second try
        fetcher.get(f"{image_server.url}/missing.jpg")
    assert sum(1 for _, n, _ in image_server.log if n == "missing.jpg") == 1
    image_server.first[name] = (503, 3600)
    with pytest.raises(BadImageError, match="asks to wait 3600 s"):  # over what a run waits: fail, go on
        fetcher.get(f"{image_server.url}/{name}")
    with pytest.raises(BadImageError, match="non-public address"):  # the guard is still there by default
        Fetcher().get(f"{image_server.url}/{name}")
    fetcher.close()


def test_prefetch_runs_ahead_within_its_window_and_hands_out_what_is_ready():
    started, taken = [0], [0]
    ahead = []

    def fetch_one(n: int) -> int:
        started[0] += 1
        if n == 3:  # a URL waiting for its retry
            time.sleep(0.3)
        return n

    out = []
    for position, n, future in prefetch(range(200), fetch_one, workers=8, window=16):
        assert future.done() and position == n
        out.append(future.result())
        taken[0] += 1
        time.sleep(0.001)
        ahead.append(started[0] - taken[0])
    assert sorted(out) == list(range(200)) and max(ahead) <= 16
    assert out.index(3) > 3 and out.index(4) < out.index(3)  # the slow one held up nothing behind it
    assert [v for batch in in_order([[(2, "c"), (0, "a")], [(1, "b")], [(3, "d")]]) for v in batch] == list("abcd")


def test_prefetch_starts_nothing_far_past_a_stuck_fetch():
    release, furthest = threading.Event(), []
    started = []

    def fetch_one(n: int) -> int:
        started.append(n)
        if n == 0:
            release.wait(5)
        return n

    def unstick() -> None:
        furthest.append(max(started))
        release.set()

    timer = threading.Timer(0.5, unstick)
    timer.start()
    got = [n for _, n, _ in prefetch(range(1000), fetch_one, workers=4, window=4)]
    timer.join()
    assert sorted(got) == list(range(1000)) and got[0] != 0
    assert furthest[0] <= LAG * 4 + 4  # what waits behind item 0 for its turn stays bounded


def feed_of(server: ImageServer, path: Path) -> Path:
    """A Merchant Center TSV of the server's images: three items of two images, items 1 and 2 variants
    of one model."""
    names = sorted(server.files)
    rows = ["id\ttitle\timage_link\tadditional_image_link\titem_group_id\tprice\tcolor"]
    for n, colour in enumerate(("Red/White", "Blue", "White")):
        a, b = names[2 * n], names[2 * n + 1]
        rows.append(f"item{n}\tShoe {n}\t{server.url}/{a}\t{server.url}/{b}\t{'model-a' if n < 2 else 'model-b'}\t"
                    f"{50 + n}.00 USD\t{colour}")  # fmt: skip
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_feed_indexes_through_the_pool_retries_and_re_fetches_only_what_changed(tmp_path, image_server):
    feed = feed_of(image_server, tmp_path / "feed.tsv")
    slow = sorted(image_server.files)[1]
    image_server.first[slow] = (503, 1)
    with Catalog.open(tmp_path / "refused", create=True) as cat:  # intranet addresses need the opt-in
        report = cat.index(feed)
    assert report.added == 0 and len(report.failed) == 6 and all("non-public" in r for _, r in report.failed)
    image_server.log.clear()
    stages: dict[str, int] = {}
    with Catalog.open(tmp_path / "cat", create=True, limits=TRUSTED) as cat:
        report = cat.index(feed, progress=lambda stage, done, total: stages.__setitem__(stage, done))
        assert stages == {"fetching": 6, "indexing": 6}  # each stage's own progress: two bars, two rates
        assert report.added == 6 and not report.failed and report.downloads["retries"] == 1
        times = [t for t, n, _ in image_server.log if n == slow]
        assert len(times) == 2 and times[1] - times[0] >= 0.95  # Retry-After: 1 was honoured
        with sqlite3.connect(tmp_path / "cat" / DB_NAME) as db:  # stored in the feed's order all the same
            stored = [name.rsplit("/", 1)[1] for (name,) in db.execute("SELECT image FROM images ORDER BY id")]
        assert stored == sorted(image_server.files)
        assert cat.product("item0")["metadata"]["price"] == 50.0
        image_server.log.clear()
        again = cat.index(feed)  # nothing changed: conditional requests, no body, nothing embedded
        assert again.unchanged == 6 and again.processed == 0
        assert again.downloads["not_modified"] == 6 and again.downloads["bytes"] == 0
        assert len(image_server.log) == 6 and all(etag for _, _, etag in image_server.log)
        changed = sorted(image_server.files)[0]  # one image replaced on the server: downloaded, re-embedded
        image_server.files[changed] = image_server.files[sorted(image_server.files)[4]]
        third = cat.index(feed)
        assert third.updated == 1 and third.unchanged == 5 and third.downloads["bytes"] > 0
        query = image_server.files[sorted(image_server.files)[2]]  # an image of item1 (model-a)
        plain = [m.product_id for m in cat.search(query, k=3, min_score=-1).results]
        collapsed = cat.search(query, k=3, min_score=-1, collapse="item_group_id").results
        assert sorted(plain) == ["item0", "item1", "item2"]
        assert [m.product_id for m in collapsed] == ["item1", "item2"]
        white = cat.search(query, k=3, min_score=-1, where={"color": "white"}).results  # one of two colours
        assert sorted(m.product_id for m in white) == ["item0", "item2"]


def test_index_cli_takes_the_private_address_opt_in(tmp_path, image_server):
    feed = feed_of(image_server, tmp_path / "feed.tsv")
    refused = cli("index", str(feed), "--catalog", str(tmp_path / "a"), "-q")
    assert refused.returncode == 3 and "non-public address" in refused.stderr and "Traceback" not in refused.stderr
    allowed = cli("index", str(feed), "--catalog", str(tmp_path / "b"), "--allow-private-urls")
    assert allowed.returncode == 0, allowed.stderr
    assert "indexed 6 image(s)" in allowed.stdout and "downloads: 6 request(s)" in allowed.stdout
    photo = tmp_path / "query.jpg"
    photo.write_bytes(image_server.files[sorted(image_server.files)[2]])  # an image of item1 (model-a)
    search = cli("search", str(photo), "--catalog", str(tmp_path / "b"), "--collapse", "item_group_id",
                 "--min-score", "-1", "--json")  # fmt: skip
    found = [m["product_id"] for m in json.loads(search.stdout)["results"]]
    assert search.returncode == 0 and found == ["item1", "item2"]
    white = cli("search", str(photo), "--catalog", str(tmp_path / "b"), "--where", "color=WHITE", "--min-score", "-1")
    assert white.returncode == 0 and "item0" in white.stdout and "color=Red/White" in white.stdout
    assert "item1" not in white.stdout and "item2" in white.stdout
    refused = cli("search", "--product", "item0", "--catalog", str(tmp_path / "b"), "--collapse", "item_group_id")
    assert refused.returncode == 2 and "--collapse applies to a photo search" in refused.stderr
