"""How a request body is taken: an endpoint that accepts uploads or URLs is two FastAPI routes on one
path, one declared with `UploadFile`/`Form` and one with a JSON model, chosen by the body's content type."""

from __future__ import annotations

from collections.abc import Callable
from typing import get_origin

from fastapi import HTTPException, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from lookalike.api.settings import ApiSettings

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
JSON_TYPES = ("application/json",)


def content_type(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.decode("latin-1").split(";")[0].strip().lower()
    return ""


class _ByContentType(APIRoute):
    """A route that matches only its own body type, so that the next route on the same path and method
    gets the request; when none takes it, the request is a 415 (a wrong method stays a 405)."""

    accepts: tuple[str, ...] = ()

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.FULL and content_type(scope) not in self.accepts:
            return Match.PARTIAL, child
        return match, child

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = content_type(scope)
        if scope["method"] in (self.methods or ()) and kind not in self.accepts:
            raise HTTPException(415, f"send multipart/form-data (uploads) or application/json (URLs), not {kind!r}")
        await super().handle(scope, receive, send)


class FormRoute(_ByContentType):
    accepts = FORM_TYPES


class JsonRoute(_ByContentType):
    accepts = JSON_TYPES


def given_once(form: type[BaseModel]) -> Callable:
    """A dependency refusing a form field meant to be given once but sent several times (FastAPI would
    silently take one copy). It reads the form FastAPI already parsed for the route."""
    single = [name for name, f in form.model_fields.items() if get_origin(f.annotation) is not list]

    async def check(request: Request) -> None:
        data = await request.form()
        repeated = [name for name in single if len(data.getlist(name)) > 1]
        if repeated:
            raise HTTPException(422, f"{', '.join(repeated)}: given more than once")

    return check


async def upload_bytes(upload: UploadFile, field: str, settings: ApiSettings) -> bytes:
    """An upload's bytes, refused over the per-image limit (the body limit covers the whole request)."""
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"{field}: upload over the {settings.max_upload_bytes}-byte limit")
    return data


def every_route(routes: list) -> list:
    """Every route of the app, those of included routers too (FastAPI keeps those inside a wrapper)."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            out += every_route(inner.routes)
        elif hasattr(route, "path_regex"):
            out.append(route)
    return out
