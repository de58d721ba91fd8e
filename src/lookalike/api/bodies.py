"""Reading a request body that may be multipart form data or JSON, with the limits the settings set."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from lookalike.api.errors import BodyTooLarge
from lookalike.api.schemas import MAX_K, _http_only
from lookalike.api.service import SMALL_BODY
from lookalike.api.settings import ApiSettings


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def upload_bytes(value: Any, field: str, settings: ApiSettings) -> bytes:
    if not isinstance(value, UploadFile):
        raise HTTPException(422, f"{field}: expected a file upload")
    data = await value.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"{field}: upload over the {settings.max_upload_bytes}-byte limit")
    return data


async def form(request: Request, single: tuple[str, ...], settings: ApiSettings):
    """The parsed form; a field meant to be given once (`single`) but sent several times is refused,
    not silently taken from its first copy."""
    try:
        data = await request.form(max_files=settings.max_images_per_product, max_fields=50,
                                  max_part_size=SMALL_BODY)  # fmt: skip
    except BodyTooLarge:
        raise
    except Exception as e:  # malformed multipart
        raise HTTPException(400, f"unreadable form data ({e})") from None
    repeated = [name for name in single if len(data.getlist(name)) > 1]
    if repeated:
        raise HTTPException(422, f"{', '.join(repeated)}: given more than once")
    return data


async def json_body(request: Request) -> Any:
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, "request body is not valid JSON") from None


def require_url(url: str) -> str:
    try:
        return _http_only(url)
    except ValueError as e:
        raise HTTPException(422, f"image_url: {e}") from None


def parse_k(text: Any) -> int:
    try:
        k = int(text)
    except (TypeError, ValueError):
        raise HTTPException(422, f"k: expected an integer from 1 to {MAX_K}") from None
    if not 1 <= k <= MAX_K:
        raise HTTPException(422, f"k: must be from 1 to {MAX_K} (got {k})")
    return k
