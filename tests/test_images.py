"""Image loading: every bad input gets one clear reason; URL fetching is guarded."""

from __future__ import annotations

import http.server
import io
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import BadImageError
from lookalike.images import DEFAULT_LIMITS as DEFAULT
from lookalike.images import Limits, decode, fetch_url, load_image, read_bytes


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def reason(data: bytes, limits: Limits = DEFAULT) -> str:
    with pytest.raises(BadImageError) as e:
        decode(data, "x.jpg", limits)
    assert str(e.value).startswith("x.jpg: ")
    return e.value.reason


def test_bad_files_get_a_reason():
    good = jpeg_bytes(Image.new("RGB", (64, 48), "red"))
    assert reason(b"") == "empty file"
    assert "not an image" in reason(b"hello, I am text")
    assert "corrupt or truncated" in reason(good[: len(good) // 2])
    assert reason(good[:20] + b"\x00" * 200) in ("not an image (unrecognised format)",) or "corrupt" in reason(
        good[:20] + b"\x00" * 200
    )


def test_decompression_bomb_refused_before_decoding():
    bomb = png_bytes(Image.new("1", (20_000, 20_000)))  # tiny file, 400 Mpx
    assert len(bomb) < 200_000
    assert "decompression bomb" in reason(bomb)
    large = png_bytes(Image.new("1", (8_000, 8_000)))  # 64 Mpx: under Pillow's guard, over ours
    assert "pixel limit" in reason(large)
    assert "pixel limit" in reason(png_bytes(Image.new("1", (100, 100))), Limits(max_pixels=5_000))


def test_modes_become_rgb():
    cmyk = Image.new("CMYK", (10, 10), (0, 255, 255, 0))  # red in CMYK
    out = decode(jpeg_bytes(cmyk))
    assert out.mode == "RGB" and out.getpixel((5, 5))[0] > 200

    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert decode(png_bytes(deep)).getpixel((0, 0)) == (255, 255, 255)

    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0] * 256)
    out = decode(png_bytes(pal, transparency=0))  # fully transparent -> white background
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (255, 255, 255)

    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    assert decode(png_bytes(rgba)).getpixel((1, 1)) == (0, 0, 255)


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    out = decode(jpeg_bytes(img, exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_paths(tmp_path):
    with pytest.raises(BadImageError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(BadImageError, match="directory"):
        load_image(tmp_path)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 2000)
    with pytest.raises(BadImageError, match="limit"):
        read_bytes(big, Limits(max_bytes=1000))


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://127.0.0.1/x.jpg", "non-public"),
        ("http://localhost:8080/x.jpg", "non-public"),
        ("http://10.1.2.3/x.jpg", "non-public"),
        ("http://192.168.0.1/x.jpg", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),
        ("http://[::1]/x.jpg", "non-public"),
        ("http://[::ffff:127.0.0.1]/x.jpg", "non-public"),
        ("http://224.0.0.1/x.jpg", "non-public"),
        ("file:///etc/passwd", "scheme"),
        ("ftp://example.com/x.jpg", "scheme"),
        ("gopher://example.com/", "scheme"),
    ],
)
def test_ssrf_refused(url, why):
    with pytest.raises(BadImageError, match=why):
        fetch_url(url)


def test_hostname_is_checked_on_its_resolved_address(monkeypatch):
    real = socket.getaddrinfo

    def fake(host, *a, **kw):
        if host == "shop.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 80))]
        return real(host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(BadImageError, match="10.0.0.7"):
        fetch_url("http://shop.example/shoe.jpg")


@pytest.fixture()
def server():
    """A real HTTP server on loopback serving a few routes."""
    image = jpeg_bytes(Image.new("RGB", (32, 32), "blue"))
    routes = {
        "/shoe.jpg": (200, {"Content-Type": "image/jpeg"}, image),
        "/big.jpg": (200, {}, b"\xff" * 5000),
        "/missing.jpg": (404, {}, b"nope"),
        "/to-shoe": (302, {"Location": "/shoe.jpg"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_from_a_real_server(server):
    trusted = Limits(allow_private_urls=True, max_bytes=4000)
    with pytest.raises(BadImageError, match="non-public"):
        load_image(server + "/shoe.jpg")  # default limits: loopback refused
    assert load_image(server + "/shoe.jpg", trusted).size == (32, 32)
    assert load_image(server + "/to-shoe", trusted).size == (32, 32)
    with pytest.raises(BadImageError, match="limit"):
        fetch_url(server + "/big.jpg", trusted)
    with pytest.raises(BadImageError, match="HTTP 404"):
        fetch_url(server + "/missing.jpg", trusted)
    with pytest.raises(BadImageError, match="scheme"):
        fetch_url(server + "/to-file", trusted)
    with pytest.raises(BadImageError, match="redirects"):
        fetch_url(server + "/loop", trusted)


def test_unreachable_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BadImageError, match="unreachable"):
        fetch_url(f"http://127.0.0.1:{port}/x.jpg", Limits(allow_private_urls=True, timeout_s=2))
