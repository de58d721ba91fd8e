"""POST /search: a photo upload (multipart `image`) or a photo URL (JSON `url`) -> ranked products."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Form

from lookalike.api.bodies import FormRoute, JsonRoute, given_once, upload_bytes
from lookalike.api.schemas import ERRORS, BoxModel, SearchForm, SearchRequest, also_as_form
from lookalike.api.service import SMALL_BODY, Service, service
from lookalike.pipeline import BoxChoice, SearchResult


def router(reads: list) -> list[APIRouter]:
    forms = APIRouter(route_class=FormRoute, dependencies=reads)
    jsons = APIRouter(route_class=JsonRoute, dependencies=reads)

    # two files, so that a second `image` is refused by name (given_once) rather than as "too many files"
    limits = {"max_files": 2, "max_fields": 10, "max_part_size": SMALL_BODY}

    @forms.post("/search", response_model=SearchResult, include_in_schema=False,
                dependencies=[Depends(given_once(SearchForm))], form_limits=limits)  # fmt: skip
    async def search_upload(form: Annotated[SearchForm, Form()], svc: Service = Depends(service)) -> Any:  # noqa: B008
        image = await upload_bytes(form.image, "image", svc.settings)
        return await _search(
            svc, image, form.k, form.where, BoxChoice.parse(form.box), form.rank, form.min_score, form.collapse
        )

    @jsons.post("/search", response_model=SearchResult, responses=ERRORS, openapi_extra=also_as_form(SearchForm))
    async def search(body: SearchRequest, svc: Service = Depends(service)) -> Any:  # noqa: B008
        """Search with an uploaded photo (multipart field `image`) or a photo URL (JSON `url`)."""
        image = await svc.fetch(body.url)
        return await _search(svc, image, body.k, body.where, _box(body.box), body.rank, body.min_score, body.collapse)

    return [forms, jsons]


async def _search(svc: Service, image: bytes, k: int, where: dict | None, box: BoxChoice, rank: str,
                  min_score: float | None, collapse: str | None = None) -> dict:  # fmt: skip
    # kept if the log is on
    search = partial(svc.catalog.search, image, k, where, box, rank, min_score, log=True, collapse=collapse)
    result = await anyio.to_thread.run_sync(search, limiter=svc.inference)
    svc.stats.search(result.query.took_ms)
    return result.to_dict()


def _box(value: int | str | BoxModel | None) -> BoxChoice:
    """A JSON body's `box`: a detected box's index, text as the CLI takes it, or a box in pixels."""
    if isinstance(value, BoxModel):
        return BoxChoice.manual(value.x1, value.y1, value.x2, value.y2)
    if isinstance(value, int):
        return BoxChoice.detected(value) if value >= 0 else BoxChoice.parse(str(value))
    return BoxChoice.parse(value)
