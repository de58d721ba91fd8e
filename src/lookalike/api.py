"""The REST API for shops (FastAPI). Calls the pipeline (`Catalog`) only.

    lookalike serve --catalog DIR [--host 127.0.0.1] [--port 8000]

Reads: POST /search, GET /products/{id}, GET /products/{id}/image/{n}, GET /health, GET /stats.
Writes (need `Authorization: Bearer $LOOKALIKE_API_TOKEN`; off when no token is configured):
POST /products, DELETE /products/{id}. Every error is a JSON body {"error": "..."} with a 4xx status.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from lookalike.errors import LookalikeError, ModelMissingError
from lookalike.pipeline import Catalog, Limits, parse_box

MAX_K = 100
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class ApiSettings:
    token: str | None = None  # None: writes are off
    protect_reads: bool = False
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    url_timeout_s: float = 10.0
    max_images_per_product: int = 20
    threads: int = 2
    allow_private_urls: bool = False  # tests and trusted intranets only

    @classmethod
    def from_env(cls, token_file: str | None = None, **overrides) -> ApiSettings:
        token = os.environ.get("LOOKALIKE_API_TOKEN") or None
        if token_file:
            try:
                token = Path(token_file).read_text().strip() or None
            except OSError as e:
                raise LookalikeError(f"{token_file}: cannot read the API token ({e.strerror})") from None
        return cls(token=token, **overrides)


# -- schemas ----------------------------------------------------------------------------------
class BoxModel(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float
    score: float = 1.0
    label: str = "manual"


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="http(s) URL of the photo (public addresses only)")
    k: int = Field(10, ge=1, le=MAX_K)
    box: int | str | BoxModel | None = Field(
        None, description="detected box index, 'whole', or a box in pixels; default: automatic"
    )
    where: dict[str, str] | None = Field(None, description='metadata filters, e.g. {"brand": "nike"}')


class QueryModel(BaseModel):
    boxes: list[BoxModel]
    box_used: BoxModel | None
    crop: str
    took_ms: float


class MatchModel(BaseModel):
    product_id: str
    score: float
    image: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    query: QueryModel
    results: list[MatchModel]


class ProductImage(BaseModel):
    n: int
    image: str
    href: str


class ProductResponse(BaseModel):
    product_id: str
    metadata: dict[str, Any]
    images: list[ProductImage]


class ProductRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    product_id: str = Field(min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    image_urls: list[str] = Field(min_length=1, max_length=20)


class ErrorResponse(BaseModel):
    error: str


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 503)}


def _form_or_json(form_schema: dict, json_model: type[BaseModel]) -> dict:
    """OpenAPI for an endpoint that takes either multipart form data or a JSON body."""
    json_schema = json_model.model_json_schema(ref_template="#/components/schemas/{model}")
    content = {"multipart/form-data": {"schema": {"type": "object", **form_schema}},
               "application/json": {"schema": json_schema}}  # fmt: skip
    return {"requestBody": {"required": True, "content": content}}


SEARCH_BODY = _form_or_json(
    {
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary"},
            "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
            "box": {"type": "string", "description": "box index, 'whole', or x1,y1,x2,y2"},
            "where": {"type": "string", "description": "JSON object of metadata filters"},
        },
    },
    SearchRequest,
)
PRODUCT_BODY = _form_or_json(
    {
        "required": ["product_id"],
        "properties": {
            "product_id": {"type": "string", "minLength": 1},
            "metadata": {"type": "string", "description": "JSON object"},
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "image_url": {"type": "array", "items": {"type": "string"}},
        },
    },
    ProductRequest,
)


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.searches = 0
        self.writes = 0
        self.latencies: deque[float] = deque(maxlen=1000)

    def search(self, ms: float) -> None:
        with self.lock:
            self.searches += 1
            self.latencies.append(ms)

    def snapshot(self) -> dict:
        with self.lock:
            lat = sorted(self.latencies)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 2)) if lat else (lambda q: None)
        return {"searches": self.searches, "writes": self.writes, "uptime_s": round(time.time() - self.started, 1),
                "search_ms_p50": pick(0.5), "search_ms_p95": pick(0.95)}  # fmt: skip


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(catalog_dir: str | Path, settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings.from_env()
    limits = Limits(
        max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels, timeout_s=settings.url_timeout_s,
        allow_private_urls=settings.allow_private_urls,
    )  # fmt: skip
    catalog = Catalog.open(catalog_dir, threads=settings.threads, limits=limits)
    stats = Stats()
    bearer = HTTPBearer(auto_error=False)
    app = FastAPI(
        title="lookalike",
        version="0.1.0",
        description="Visual product search for shoe catalogs: send a photo, get the most similar products.",
    )
    app.state.catalog = catalog

    # -- errors: always JSON, never a trace ----------------------------------------------------
    @app.exception_handler(LookalikeError)
    async def lookalike_error(_: Request, e: LookalikeError) -> JSONResponse:
        return _error(503 if isinstance(e, ModelMissingError) else 400, str(e))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        response = _error(e.status_code, str(e.detail))
        if e.status_code == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(e).__name__})")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        limit = settings.max_upload_bytes * settings.max_images_per_product + 64 * 1024
        if length is not None and (not length.isdigit() or int(length) > limit):
            return _error(413, f"request body over the {limit}-byte limit")
        return await call_next(request)

    # -- auth ------------------------------------------------------------------------------------
    def check_token(credentials: HTTPAuthorizationCredentials | None) -> None:
        if settings.token is None:
            raise HTTPException(403, "writes are disabled: start the server with LOOKALIKE_API_TOKEN set")
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token")

    def writer(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        check_token(credentials)

    def reader(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if settings.protect_reads:
            check_token(credentials)

    # -- reads -----------------------------------------------------------------------------------
    async def upload_bytes(value: Any, field: str) -> bytes:
        if not isinstance(value, UploadFile):
            raise HTTPException(422, f"{field}: expected a file upload")
        data = await value.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"{field}: upload over the {settings.max_upload_bytes}-byte limit")
        return data

    async def form(request: Request):
        try:
            return await request.form(max_files=settings.max_images_per_product, max_fields=50,
                                      max_part_size=64 * 1024)  # fmt: skip
        except Exception as e:  # malformed multipart
            raise HTTPException(400, f"unreadable form data ({e})") from None

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except (ValueError, UnicodeDecodeError):
            raise HTTPException(400, "request body is not valid JSON") from None

    def require_url(url: str) -> str:
        """Only http(s): a bare string would otherwise be read as a path on the server."""
        if not url.lower().startswith(("http://", "https://")):
            raise HTTPException(400, f"{url[:200]!r}: only http:// and https:// URLs are accepted")
        return url

    def parse_k(text: Any) -> int:
        try:
            k = int(text)
        except (TypeError, ValueError):
            raise HTTPException(422, f"k: expected an integer from 1 to {MAX_K}") from None
        if not 1 <= k <= MAX_K:
            raise HTTPException(422, f"k: must be from 1 to {MAX_K} (got {k})")
        return k

    @app.post("/search", response_model=SearchResponse, responses=ERRORS, openapi_extra=SEARCH_BODY,
              dependencies=[Depends(reader)])  # fmt: skip
    async def search(request: Request) -> Any:
        """Search with an uploaded photo (multipart field `image`) or a photo URL (JSON `url`)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in FORM_TYPES:
            data = await form(request)
            image = await upload_bytes(data.get("image"), "image")
            k = parse_k(data.get("k", 10))
            box = parse_box(data.get("box") if isinstance(data.get("box"), str) else None)
            where_text = data.get("where")
            where = None
            if isinstance(where_text, str) and where_text.strip():
                try:
                    where = json.loads(where_text)
                except ValueError:
                    raise HTTPException(422, "where: expected a JSON object") from None
                if not isinstance(where, dict) or not all(isinstance(v, str) for v in where.values()):
                    raise HTTPException(422, "where: expected a JSON object of strings")
            source: Any = image
        elif kind == "application/json":
            try:
                body = SearchRequest.model_validate(await json_body(request))
            except ValueError as e:
                raise RequestValidationError(getattr(e, "errors", lambda: [])()) from None
            source, k, where = require_url(body.url), body.k, body.where
            box = body.box.model_dump() if isinstance(body.box, BoxModel) else body.box
            if isinstance(box, str):
                box = parse_box(box)
        else:
            raise HTTPException(415, "send multipart/form-data with an `image` file, or JSON with a `url`")
        result = await run_in_threadpool(catalog.search, source, k, where, box)
        stats.search(result.query.took_ms)
        return result.to_dict()

    def product_response(product: dict) -> dict:
        pid = product["product_id"]
        images = [
            {"n": n, "image": img, "href": f"/products/{pid}/image/{n}"} for n, img in enumerate(product["images"])
        ]
        return {"product_id": pid, "metadata": product["metadata"], "images": images}

    @app.get("/products/{product_id}", response_model=ProductResponse, responses=ERRORS,
             dependencies=[Depends(reader)])  # fmt: skip
    def get_product(product_id: str) -> Any:
        product = catalog.product(product_id)
        if product is None:
            raise HTTPException(404, f"no product {product_id!r}")
        return product_response(product)

    @app.get("/products/{product_id}/image/{n}", responses={**ERRORS, 200: {"content": {"image/*": {}}}},
             dependencies=[Depends(reader)])  # fmt: skip
    def get_product_image(product_id: str, n: int) -> Any:
        product = catalog.product(product_id)
        if product is None:
            raise HTTPException(404, f"no product {product_id!r}")
        if not 0 <= n < len(product["images"]):
            raise HTTPException(404, f"product {product_id!r} has {len(product['images'])} image(s); no image {n}")
        image = product["images"][n]
        if image.startswith(("http://", "https://")):
            return RedirectResponse(image, status_code=307)
        if not Path(image).is_file():
            raise HTTPException(404, f"image {n} of {product_id!r} is no longer on disk")
        return FileResponse(image)

    @app.get("/health")
    def health() -> dict:
        info = catalog.info()
        return {"status": "ok", "models_loaded": catalog.models_loaded(), "products": info["products"],
                "images": info["images"]}  # fmt: skip

    @app.get("/stats", dependencies=[Depends(reader)], responses=ERRORS)
    def get_stats() -> dict:
        info = catalog.info()
        return {"products": info["products"], "images": info["images"], "index": info["index"], "dim": info["dim"],
                **stats.snapshot()}  # fmt: skip

    # -- writes ----------------------------------------------------------------------------------
    @app.post("/products", status_code=201, response_model=ProductResponse, responses=ERRORS,
              openapi_extra=PRODUCT_BODY, dependencies=[Depends(writer)])  # fmt: skip
    async def put_product(request: Request) -> Any:
        """Add or replace a product: its id, metadata and images (uploads and/or URLs)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in FORM_TYPES:
            data = await form(request)
            product_id = data.get("product_id")
            if not isinstance(product_id, str) or not product_id.strip() or len(product_id) > 200:
                raise HTTPException(422, "product_id: required, 1 to 200 characters")
            metadata: Any = {}
            if isinstance(data.get("metadata"), str) and data.get("metadata").strip():
                try:
                    metadata = json.loads(data.get("metadata"))
                except ValueError:
                    raise HTTPException(422, "metadata: expected a JSON object") from None
                if not isinstance(metadata, dict):
                    raise HTTPException(422, "metadata: expected a JSON object")
            images: list[Any] = [await upload_bytes(f, "images") for f in data.getlist("images")]
            images += [require_url(u) for u in data.getlist("image_url") if isinstance(u, str) and u]
        elif kind == "application/json":
            try:
                body = ProductRequest.model_validate(await json_body(request))
            except ValueError as e:
                raise RequestValidationError(getattr(e, "errors", lambda: [])()) from None
            product_id, metadata, images = body.product_id, body.metadata, [require_url(u) for u in body.image_urls]
        else:
            raise HTTPException(415, "send multipart/form-data or JSON")
        if not images:
            raise HTTPException(422, "a product needs at least one image (`images` uploads or `image_url`)")
        if len(images) > settings.max_images_per_product:
            raise HTTPException(422, f"at most {settings.max_images_per_product} images per product")
        product = await run_in_threadpool(catalog.add_product, product_id.strip(), images, metadata)
        with stats.lock:
            stats.writes += 1
        return product_response(product)

    @app.delete("/products/{product_id}", responses=ERRORS, dependencies=[Depends(writer)])
    def delete_product(product_id: str) -> dict:
        removed = catalog.remove([product_id])
        if not removed:
            raise HTTPException(404, f"no product {product_id!r}")
        with stats.lock:
            stats.writes += 1
        return {"product_id": product_id, "removed_images": removed}

    return app


def serve(catalog_dir: str, host: str = "127.0.0.1", port: int = 8000, settings: ApiSettings | None = None) -> None:
    import uvicorn

    app = create_app(catalog_dir, settings)
    app.state.catalog.warm_up()
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
