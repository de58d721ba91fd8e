"""POST /search: a photo upload (multipart `image`) or a photo URL (JSON `url`) -> ranked products."""

from __future__ import annotations

import json
from typing import Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError

from lookalike.api.bodies import content_type, form, json_body, parse_k, upload_bytes
from lookalike.api.schemas import ERRORS, FORM_TYPES, SEARCH_BODY, BoxModel, SearchRequest
from lookalike.api.service import Service, service
from lookalike.pipeline import DEFAULT_RANK, RANKS, BoxChoice, SearchResult


def router(reads: list) -> APIRouter:
    api = APIRouter(dependencies=reads)

    @api.post("/search", response_model=SearchResult, responses=ERRORS, openapi_extra=SEARCH_BODY)
    async def search(request: Request, svc: Service = Depends(service)) -> Any:  # noqa: B008
        """Search with an uploaded photo (multipart field `image`) or a photo URL (JSON `url`)."""
        kind = content_type(request)
        if kind in FORM_TYPES:
            data = await form(request, ("image", "k", "box", "where", "rank"), svc.settings)
            rank = data.get("rank", DEFAULT_RANK)
            if rank not in RANKS:
                raise HTTPException(422, f"rank: expected one of {', '.join(RANKS)}")
            source: Any = await upload_bytes(data.get("image"), "image", svc.settings)
            k = parse_k(data.get("k", 10))
            box = BoxChoice.parse(data.get("box") if isinstance(data.get("box"), str) else None)
            where = _where(data.get("where"))
        elif kind == "application/json":
            try:
                body = SearchRequest.model_validate(await json_body(request))
            except ValueError as e:
                raise RequestValidationError(getattr(e, "errors", lambda: [])()) from None
            source, k, where, rank = await svc.fetch(body.url), body.k, body.where, body.rank
            box = _box(body.box)
        else:
            raise HTTPException(415, "send multipart/form-data with an `image` file, or JSON with a `url`")
        result = await anyio.to_thread.run_sync(svc.catalog.search, source, k, where, box, rank,
                                                limiter=svc.inference)  # fmt: skip
        svc.stats.search(result.query.took_ms)
        return result.to_dict()

    return api


def _where(text: Any) -> dict[str, str] | None:
    """A form's `where` field: a JSON object of strings, or blank for none."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        where = json.loads(text)
    except ValueError:
        raise HTTPException(422, "where: expected a JSON object") from None
    if not isinstance(where, dict) or not all(isinstance(v, str) for v in where.values()):
        raise HTTPException(422, "where: expected a JSON object of strings")
    return where


def _box(value: int | str | BoxModel | None) -> BoxChoice:
    """A JSON body's `box`: a detected box's index, text as the CLI takes it, or a box in pixels."""
    if isinstance(value, BoxModel):
        return BoxChoice.manual(value.x1, value.y1, value.x2, value.y2)
    if isinstance(value, int):
        return BoxChoice.detected(value) if value >= 0 else BoxChoice.parse(str(value))
    return BoxChoice.parse(value)
