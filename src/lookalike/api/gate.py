"""What is checked before a request body is read: its size, and the token where the route needs one.

FastAPI reads and parses a form body (spooling its uploads) before it runs any dependency, so the
`writer` dependency alone would let an unauthenticated client send a full upload first; these two
ASGI middlewares answer before the first byte of body is taken."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from lookalike.api.bodies import content_type, every_route
from lookalike.api.errors import http_error_response
from lookalike.api.service import token_refusal, writer
from lookalike.api.settings import ApiSettings


class BodyTooLarge(HTTPException):
    """An HTTPException, so that a body parser (which turns other errors into a 400) lets it through."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the {limit}-byte limit", {"Connection": "close"})


class BodyLimit:
    """Refuses a request body over its limit while it streams, before any handler, parser or token
    check sees it: a Content-Length over the limit is answered at once, and a chunked body is cut off
    as soon as the limit is passed. Nothing ever buffers or spools more than the limit."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str, str], int]):  # (method, path, media type)
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["method"], scope["path"], content_type(scope))
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await http_error_response(BodyTooLarge(limit))(scope, receive, send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:
            if not started:  # the server closes the connection: the rest of the body is never read
                await http_error_response(e)(scope, receive, send)


class TokenFirst:
    """A request for a route that depends on `writer` (every write; reads too with --protect-reads)
    is refused 401/403 here when its token is missing or wrong, before its body is read."""

    def __init__(self, app: ASGIApp, api: FastAPI, settings: ApiSettings):
        self.app, self.api, self.settings = app, api, settings
        self.guarded: list | None = None  # found on the first request, once every router is included

    def needs_token(self, scope: Scope) -> bool:
        if self.guarded is None:
            self.guarded = [r for r in every_route(self.api.routes) if writer in _calls(getattr(r, "dependant", None))]
        return any(scope["method"] in (r.methods or ()) and r.path_regex.match(scope["path"]) for r in self.guarded)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.needs_token(scope):
            scheme, _, given = (Headers(scope=scope).get("authorization") or "").partition(" ")
            refusal = token_refusal(self.settings.token, given.strip() if scheme.lower() == "bearer" else "")
            if refusal is not None:
                return await http_error_response(refusal)(scope, receive, send)
        await self.app(scope, receive, send)


def _calls(dependant) -> set:
    """Every callable a route depends on, however deep."""
    if dependant is None:
        return set()
    return {dependant.call} | {c for d in dependant.dependencies for c in _calls(d)}
