"""Load images from paths, http(s) URLs or bytes, safely.

Every failure becomes a BadImageError naming the input and the reason, so a long indexing
run can report it and go on. URLs are fetched with server-side request forgery guards: only
http(s), only public addresses (checked on the resolved address, and the connection is pinned
to that address so DNS cannot change between check and use), every redirect re-checked,
size and time limits.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError

from lookalike.errors import BadImageError

ImageSource = str | Path | bytes


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


def describe(source: ImageSource) -> str:
    if isinstance(source, bytes | bytearray):
        return f"<{len(source)} bytes>"
    return str(source)


def read_bytes(source: ImageSource, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The raw bytes of a path, URL or bytes input, within the size limit."""
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    elif is_url(source):
        data = fetch_url(str(source), limits)
    else:
        text = str(source)
        if "://" in text:
            raise BadImageError(text, "only http:// and https:// URLs are allowed")
        path = Path(text)
        try:
            size = path.stat().st_size
            if size > limits.max_bytes:
                raise BadImageError(text, f"file is {size} bytes, over the {limits.max_bytes}-byte limit")
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadImageError(text, "file not found") from None
        except IsADirectoryError:
            raise BadImageError(text, "is a directory, not an image file") from None
        except PermissionError:
            raise BadImageError(text, "permission denied") from None
    if len(data) > limits.max_bytes:
        raise BadImageError(describe(source), f"{len(data)} bytes, over the {limits.max_bytes}-byte limit")
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


def load_image(source: ImageSource, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    return decode(read_bytes(source, limits), describe(source), limits)


def _check_address(url: str, host: str, port: int, limits: Limits) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise BadImageError(url, f"host {host!r} cannot be resolved ({e})") from None
    addresses = sorted({info[4][0] for info in infos})
    if not addresses:
        raise BadImageError(url, f"host {host!r} has no address")
    if not limits.allow_private_urls:
        for addr in addresses:
            ip = ipaddress.ip_address(addr.split("%")[0])
            if ip.version == 6 and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            if not ip.is_global or ip.is_multicast:
                raise BadImageError(
                    url,
                    f"refused: {host} resolves to {ip}, a non-public address (loopback/private/link-local)",
                )
    return addresses[0]


def fetch_url(url: str, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """GET an image URL with SSRF guards, following redirects only to allowed addresses."""
    current = url
    for _ in range(limits.max_redirects + 1):
        parts = urlsplit(current)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise BadImageError(url, f"refused: scheme {scheme or '(none)'!r} is not http or https")
        host = parts.hostname
        if not host:
            raise BadImageError(url, "URL has no host")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise BadImageError(url, "URL has an invalid port") from None
        ip = _check_address(url, host, port, limits)
        timeout = urllib3.Timeout(connect=limits.timeout_s, read=limits.timeout_s)
        kwargs = {"timeout": timeout, "retries": False, "maxsize": 1}
        if scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                ip, port, server_hostname=host, assert_hostname=host, cert_reqs="CERT_REQUIRED", **kwargs
            )
        else:
            pool = urllib3.HTTPConnectionPool(ip, port, **kwargs)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        try:
            with pool:
                resp = pool.urlopen(
                    "GET",
                    path,
                    headers={"Host": host_header, "User-Agent": "lookalike/0.1", "Accept": "image/*"},
                    redirect=False,
                    preload_content=False,
                )
                try:
                    if resp.status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location")
                        if not location:
                            raise BadImageError(url, f"redirect ({resp.status}) without a Location")
                        current = urljoin(current, location)
                        continue
                    if resp.status != 200:
                        raise BadImageError(url, f"HTTP {resp.status}")
                    length = resp.headers.get("Content-Length")
                    if length and length.isdigit() and int(length) > limits.max_bytes:
                        raise BadImageError(
                            url, f"download of {length} bytes is over the {limits.max_bytes}-byte limit"
                        )
                    data = resp.read(limits.max_bytes + 1)
                    if len(data) > limits.max_bytes:
                        raise BadImageError(url, f"download is over the {limits.max_bytes}-byte limit")
                    return data
                finally:
                    resp.release_conn()
        except BadImageError:
            raise
        except urllib3.exceptions.HTTPError as e:
            raise BadImageError(url, f"unreachable ({type(e).__name__}: {e})") from None
        except OSError as e:
            raise BadImageError(url, f"unreachable ({e})") from None
    raise BadImageError(url, f"more than {limits.max_redirects} redirects")
