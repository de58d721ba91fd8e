"""Every answer that is not a success is JSON {"error": "..."}, short, never a trace; bodies over their
limit are refused while they stream."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lookalike.api.service import MAX_MESSAGE
from lookalike.errors import LookalikeError, ModelMissingError


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 30] + f"...({len(message)} characters)"
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body over the {limit}-byte limit")


class BodyLimit:
    """Refuses a request body over its limit while it streams, before any handler, parser or token
    check sees it: a Content-Length over the limit is answered at once, and a chunked body is cut off
    as soon as the limit is passed. Nothing ever buffers or spools more than the limit."""

    def __init__(self, app, limit_for):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        limit = self.limit_for(scope["method"], scope["path"], headers.get(b"content-type", b"").decode("latin-1"))
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await error(413, str(BodyTooLarge(limit)), {"Connection": "close"})(scope, receive, send)
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
                await error(413, str(e), {"Connection": "close"})(scope, receive, send)


def install(app: FastAPI) -> None:
    """The error handlers: LookalikeError 400 (503 for a missing model), validation 422, HTTP errors
    with their headers (Allow on a 405 lists every method of the path), anything else a bare 500."""

    @app.exception_handler(LookalikeError)
    async def lookalike_error(_: Request, e: LookalikeError) -> JSONResponse:
        return error(503 if isinstance(e, ModelMissingError) else 400, str(e))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        headers = dict(e.headers or {})  # e.g. Retry-After on a 503
        if e.status_code == 405:  # every route on this path, not only the first one that matched
            routes = _flat(app.routes)
            allowed = {m for r in routes if r.path_regex.match(request.url.path) for m in r.methods or ()}
            headers["Allow"] = ", ".join(sorted(allowed))
        if e.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error(e.status_code, str(e.detail), headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error ({type(e).__name__})")


def _flat(routes) -> list:
    """Every route of the app, those of included routers too (FastAPI keeps those inside a wrapper)."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            out += _flat(inner.routes)
        elif hasattr(route, "path_regex"):
            out.append(route)
    return out
