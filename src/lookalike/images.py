"""Load images from paths, http(s) URLs or bytes, safely.

Every failure becomes a BadImageError naming the input and the reason, so a long indexing
run can report it and go on. URLs are fetched with server-side request forgery guards: only
http(s), only public addresses (checked on the resolved address, and the connection is pinned
to that address so DNS cannot change between check and use), every redirect re-checked,
size and time limits.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import ipaddress
import os
import socket
import stat
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urljoin, urlsplit

import numpy as np
import urllib3
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from lookalike.errors import BadImageError, LookalikeError


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 50_000_000
    timeout_s: float = 10.0
    max_redirects: int = 5
    allow_private_urls: bool = False  # for tests and trusted intranets only


DEFAULT_LIMITS = Limits()


def is_url(source: object) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


MAX_NAME = 300  # characters of an input's name shown in a message: errors never echo unbounded input


@dataclass(frozen=True)
class ImageSource:
    """One input photo that knows what it is: a local `path`, an http(s) `url` (fetched under the
    guards of `fetch_url`) or `bytes` (an upload). Made once, where the input arrives."""

    kind: Literal["path", "url", "bytes"]
    value: str | bytes

    @classmethod
    def of(cls, source: ImageInput) -> ImageSource:
        if isinstance(source, ImageSource):
            return source
        if isinstance(source, bytes | bytearray):
            return cls("bytes", bytes(source))
        text = str(source)
        if is_url(text):
            return cls("url", text)
        if "://" in text:
            raise BadImageError(shorten(text), "only http:// and https:// URLs are allowed")
        return cls("path", text)

    @classmethod
    def url(cls, text: str) -> ImageSource:
        """An address a user typed as a URL: only http(s), never read as a path on this machine."""
        if not is_url(text):
            raise BadImageError(shorten(text), "only http:// and https:// URLs are accepted")
        return cls("url", text)

    @property
    def name(self) -> str:
        """A short printable name, for messages."""
        return f"<{len(self.value)} bytes>" if self.kind == "bytes" else shorten(self.value)


ImageInput = str | Path | bytes | ImageSource  # what the Python API takes; made an ImageSource at once


def describe(source: ImageInput) -> str:
    """A short printable name for an input, for messages."""
    if isinstance(source, bytes | bytearray):
        return f"<{len(source)} bytes>"
    return source.name if isinstance(source, ImageSource) else shorten(str(source))


def shorten(text: str, limit: int = MAX_NAME) -> str:
    """`text` cut to `limit` characters, with undecodable bytes of a file name shown escaped."""
    try:  # a file name's undecodable bytes arrive as surrogates: show them as the bytes they were
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} characters)"


def read_bytes(source: ImageInput, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The raw bytes of a path, URL or bytes input, within the size limit."""
    source = ImageSource.of(source)
    if source.kind == "bytes":
        data = source.value
    elif source.kind == "url":
        data = fetch_url(source.value, limits)
    else:
        data = read_file(Path(source.value), limits.max_bytes)
    if len(data) > limits.max_bytes:
        raise BadImageError(source.name, f"{len(data)} bytes, over the {limits.max_bytes}-byte limit")
    return data


def read_file(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes, at most `max_bytes`. Opened without blocking and checked on the open
    descriptor, so a FIFO cannot hang a run and /dev/zero cannot fill the memory."""
    name = describe(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise BadImageError(name, "file not found") from None
    except IsADirectoryError:
        raise BadImageError(name, "is a directory, not an image file") from None
    except PermissionError:
        raise BadImageError(name, "permission denied") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadImageError(name, "symbolic link loop") from None
        raise BadImageError(name, f"cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BadImageError(name, "is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise BadImageError(name, "not a regular file (device, FIFO or socket)")
        if st.st_size > max_bytes:
            raise BadImageError(name, f"file is {st.st_size} bytes, over the {max_bytes}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise BadImageError(name, f"cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise BadImageError(name, f"file is over the {max_bytes}-byte limit")
    return data


def decode(data: bytes, name: str = "<bytes>", limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """Decode to an upright 8-bit RGB image; transparency is flattened on white like a catalog shot."""
    if not data:
        raise BadImageError(name, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_pixels:
                raise BadImageError(name, f"{w}x{h} pixels is over the {limits.max_pixels}-pixel limit")
            img.load()
            img = ImageOps.exif_transpose(img)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(name, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(name, f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(name, f"corrupt or truncated image ({e})") from None
    if img.width < 1 or img.height < 1:
        raise BadImageError(name, "image has no pixels")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class Photo:
    """An input's bytes, read once, with their content hash (what catalogs and caches key on)."""

    name: str
    data: bytes
    sha256: str

    def image(self, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
        return decode(self.data, self.name, limits)


def read_photo(source: ImageInput, limits: Limits = DEFAULT_LIMITS) -> Photo:
    """The one read -> hash step: a path, a guarded URL or bytes, within the limits."""
    data = read_bytes(source, limits)
    return Photo(describe(source), data, sha256_bytes(data))


def load_image(source: ImageInput, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    return read_photo(source, limits).image(limits)


def thumbnail_uri(source: ImageInput, size: int, box: tuple[float, float, float, float] | None = None) -> str | None:
    """A photo as a small JPEG data URI (at most `size` pixels a side; `box` drawn in green), read
    and decoded as everything else is (limits, upright, RGB), for pages that must carry their
    pictures: the app's result cards, the eval report. None when it cannot be read."""
    try:
        img = decode(read_bytes(source), describe(source))
    except LookalikeError:  # unreadable, moved, over a limit
        return None
    if box is not None:
        ImageDraw.Draw(img).rectangle(box, outline="#16a34a", width=max(2, round(max(img.size) / 90)))
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d form


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a server may fetch from this address: public unicast only. IPv6 forms that carry an
    IPv4 address (mapped, IPv4-compatible, NAT64, 6to4, Teredo) are judged by that address, since
    Python's `is_global` alone lets e.g. `::127.0.0.1`, `64:ff9b::7f00:1` and `2002:7f00:1::` through."""
    if ip.is_multicast or not ip.is_global:
        return False
    if ip.version == 4:
        return True
    if ip.is_site_local:  # fec0::/10, deprecated but still routed by some stacks
        return False
    if ip.ipv4_mapped is not None:
        return is_public(ip.ipv4_mapped)
    if ip in IPV4_COMPATIBLE or any(ip in net for net in NAT64):
        return is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        return is_public(ip.sixtofour)
    if ip.teredo is not None:
        return all(is_public(v4) for v4 in ip.teredo)
    return True


def _check_address(url: str, host: str, port: int, limits: Limits) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise BadImageError(url, f"host {shorten(host, 100)!r} cannot be resolved ({e})") from None
    addresses = sorted({info[4][0] for info in infos})
    if not addresses:
        raise BadImageError(url, f"host {shorten(host, 100)!r} has no address")
    if not limits.allow_private_urls:
        for addr in addresses:
            ip = ipaddress.ip_address(addr.split("%")[0])
            if not is_public(ip):
                raise BadImageError(
                    url, f"refused: {shorten(host, 100)} resolves to {ip}, a non-public address"
                    " (loopback, private, link-local, or one of those inside an IPv6 form)",
                )  # fmt: skip
    return addresses[0]


class _Deadline:
    """One time budget for a whole fetch (every connect, redirect and byte), so a server that drips
    one byte a second cannot hold a request open: socket timeouts alone restart on every byte."""

    def __init__(self, url: str, seconds: float):
        self.url, self.seconds = url, seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise FetchError(self.url, f"download took longer than the {self.seconds:g} s limit", retryable=True)
        return left


RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}  # worth asking again: busy, throttled, a gateway's hiccup


class FetchError(BadImageError):
    """A fetch that failed in a way another try may not (`retryable`: a timeout, a refused or reset
    connection, 429 or a 5xx); `retry_after`: the seconds the server asked to wait, if it said."""

    def __init__(self, source: str, reason: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(source, reason)
        self.retryable, self.retry_after = retryable, retry_after


@dataclass(frozen=True)
class Fetched:
    """What a GET gave: the body (None when the server said it has not changed since the validators
    sent, 304) and the validators to send next time."""

    data: bytes | None
    etag: str | None = None
    last_modified: str | None = None


class Connections:
    """Kept-alive connection pools, one per (scheme, checked address, port, host), shared by threads:
    many fetches from one CDN reuse a few connections instead of a TCP (and TLS) handshake each."""

    def __init__(self, per_host: int = 8):
        self.per_host = per_host
        self._pools: dict[tuple, urllib3.HTTPConnectionPool] = {}
        self._lock = threading.Lock()

    def get(self, scheme: str, ip: str, port: int, host: str) -> urllib3.HTTPConnectionPool:
        with self._lock:
            key = (scheme, ip, port, host)
            if key not in self._pools:
                self._pools[key] = _pool(scheme, ip, port, host, self.per_host)
            return self._pools[key]

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()


def _pool(scheme: str, ip: str, port: int, host: str, size: int) -> urllib3.HTTPConnectionPool:
    """A pool pinned to the checked address `ip` (DNS cannot change between check and use), with TLS
    verified against `host`."""
    kwargs = {"retries": False, "maxsize": size}
    if scheme == "https":
        return urllib3.HTTPSConnectionPool(
            ip, port, server_hostname=host, assert_hostname=host, cert_reqs="CERT_REQUIRED", **kwargs
        )
    return urllib3.HTTPConnectionPool(ip, port, **kwargs)


def retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def fetch_url(url: str, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """GET an image URL with SSRF guards, following redirects only to allowed addresses, within one
    total deadline and the size limit."""
    data = fetch(url, limits).data
    assert data is not None  # no validators were sent
    return data


def fetch(url: str, limits: Limits = DEFAULT_LIMITS, validators: tuple[str | None, str | None] | None = None,
          connections: Connections | None = None) -> Fetched:  # fmt: skip
    """`fetch_url`, with `validators` (ETag, Last-Modified of the last download: a 304 answer is
    `Fetched(None)`) and shared kept-alive `connections` (else a connection for this fetch alone)."""
    name = describe(url)
    deadline = _Deadline(name, limits.timeout_s)
    headers = {"User-Agent": "lookalike/0.1", "Accept": "image/*"}
    etag, modified = validators or (None, None)
    if etag:
        headers["If-None-Match"] = etag
    if modified:
        headers["If-Modified-Since"] = modified
    current = url
    for _ in range(limits.max_redirects + 1):
        try:
            parts = urlsplit(current)
            host, port = parts.hostname, parts.port
        except ValueError as e:  # e.g. an unbalanced "[" in the host, a port out of range
            raise BadImageError(name, f"not a valid URL ({e})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise BadImageError(name, f"refused: scheme {shorten(scheme, 20) or '(none)'!r} is not http or https")
        if not host:
            raise BadImageError(name, "URL has no host")
        if any(ord(c) < 33 or ord(c) == 127 for c in current):
            raise BadImageError(name, "not a valid URL (spaces or control characters)")
        port = port or (443 if scheme == "https" else 80)
        ip = _check_address(name, host, port, limits)
        left = deadline.left()
        pool = connections.get(scheme, ip, port, host) if connections else _pool(scheme, ip, port, host, 1)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        try:
            resp = pool.urlopen("GET", path, headers={**headers, "Host": host_header}, redirect=False,
                                preload_content=False, timeout=urllib3.Timeout(connect=left, read=left))  # fmt: skip
            try:
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.headers.get("Location")
                    if not location:
                        raise BadImageError(name, f"redirect ({resp.status}) without a Location")
                    current = urljoin(current, location)
                    resp.drain_conn()
                    continue
                got = (resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
                if resp.status == 304 and validators:
                    resp.drain_conn()
                    return Fetched(None, *got)
                if resp.status != 200:
                    resp.drain_conn()
                    raise FetchError(name, f"HTTP {resp.status}", resp.status in RETRY_STATUSES,
                                     retry_after(resp.headers.get("Retry-After")))  # fmt: skip
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > limits.max_bytes:
                    raise BadImageError(name, f"download of {length} bytes is over the {limits.max_bytes}-byte limit")
                return Fetched(_read_body(resp, name, limits.max_bytes, deadline), *got)
            finally:
                resp.release_conn()
        except BadImageError:
            raise
        except urllib3.exceptions.HTTPError as e:
            if isinstance(e, urllib3.exceptions.TimeoutError | urllib3.exceptions.ReadTimeoutError):
                deadline.left()  # says "took longer than the limit" when that is why
            raise FetchError(name, f"unreachable ({type(e).__name__})", retryable=True) from None
        except OSError as e:
            raise FetchError(name, f"unreachable ({e.strerror or type(e).__name__})", retryable=True) from None
        except ValueError as e:  # what urllib3 or http.client refuse to send
            raise BadImageError(name, f"not a valid URL ({shorten(str(e), 100)})") from None
        finally:
            if connections is None:
                pool.close()
    raise BadImageError(name, f"more than {limits.max_redirects} redirects")


def _read_body(resp: urllib3.BaseHTTPResponse, name: str, max_bytes: int, deadline: _Deadline) -> bytes:
    """Read whatever arrives, one socket read at a time, re-arming the socket's timeout with the time
    left, so the deadline holds however slowly the bytes come."""
    chunks, size = [], 0
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    while True:
        left = deadline.left()
        if sock is not None:
            sock.settimeout(left)
        chunk = resp.read1(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise BadImageError(name, f"download is over the {max_bytes}-byte limit")
        chunks.append(chunk)


def sha256_bytes(data: bytes) -> str:
    """What names a photo's content everywhere (stored uploads, the search log's photos, caches)."""
    return hashlib.sha256(data).hexdigest()
