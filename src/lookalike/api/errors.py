"""Every answer that is not a success is JSON {"error": "..."}, short, never a trace."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lookalike.api.bodies import every_route
from lookalike.api.service import MAX_MESSAGE
from lookalike.errors import LookalikeError, ModelMissingError


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 30] + f"...({len(message)} characters)"
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def http_error_response(e: StarletteHTTPException, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = {**(e.headers or {}), **(headers or {})}  # e.g. Retry-After on a 503
    if e.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return error(e.status_code, str(e.detail), headers)


def install(app: FastAPI) -> None:
    """The error handlers: LookalikeError 400 (503 for a missing model), validation 422 (unparseable
    JSON 400), HTTP errors with their headers (Allow on a 405 lists every method of the path),
    anything else a bare 500."""

    @app.exception_handler(LookalikeError)
    async def lookalike_error(_: Request, e: LookalikeError) -> JSONResponse:
        return error(503 if isinstance(e, ModelMissingError) else 400, str(e))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        if any(err.get("type") == "json_invalid" for err in e.errors()):
            return error(400, "request body is not valid JSON")
        parts = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        headers = {}
        if e.status_code == 405:  # every route on this path, not only the first one that matched
            routes = every_route(app.routes)
            allowed = {m for r in routes if r.path_regex.match(request.url.path) for m in r.methods or ()}
            headers["Allow"] = ", ".join(sorted(allowed))
        return http_error_response(e, headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error ({type(e).__name__})")
