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
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from lookalike.errors import LookalikeError, ModelMissingError
from lookalike.pipeline import DEFAULT_RANK, RANKS, Catalog, Limits, SearchResult, parse_box

MAX_K = 100
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
SMALL_BODY = 64 * 1024  # JSON bodies and form fields: URLs, ids, metadata
MAX_URL = 2048
MAX_MESSAGE = 1000  # characters of an error message: errors never echo unbounded input


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
    max_url_fetches: int = 8  # URL fetches in flight; more are refused at once (503), never queued
    max_searches: int = 4  # inferences at once (2 cores); more wait without holding a thread

    @classmethod
    def from_env(cls, token_file: str | None = None, **overrides) -> ApiSettings:
        token = os.environ.get("LOOKALIKE_API_TOKEN") or None
        if token_file:
            try:
                token = Path(token_file).read_text().strip() or None
            except OSError as e:
                raise LookalikeError(f"{token_file}: cannot read the API token ({e.strerror})") from None
        return cls(token=token, **overrides)


def _http_only(url: str) -> str:
    """Only http(s): a bare string would otherwise be read as a path on the server."""
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError("only http:// and https:// URLs are accepted")
    return url


URL_PATTERN = "^[Hh][Tt][Tt][Pp][Ss]?://"
_NUMBER = r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*"
BOX_PATTERN = rf"^\s*(\d+|whole|{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER})?\s*$"  # blank = automatic
HttpUrlText = Annotated[
    str, Field(max_length=MAX_URL, json_schema_extra={"pattern": URL_PATTERN}), AfterValidator(_http_only)
]


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
    url: HttpUrlText = Field(description="http(s) URL of the photo (public addresses only)")
    k: int = Field(10, ge=1, le=MAX_K)
    box: int | str | BoxModel | None = Field(
        None, description="detected box index, 'whole', or a box in pixels; default: automatic"
    )
    where: dict[str, str] | None = Field(None, description='metadata filters, e.g. {"brand": "nike"}')
    rank: Literal[RANKS] = Field(  # type: ignore[valid-type]
        DEFAULT_RANK, description="a product's score: its best image, or the mean of its best 2 or 3"
    )


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
    image_urls: list[HttpUrlText] = Field(min_length=1, max_length=20)


class ErrorResponse(BaseModel):
    error: str


class HealthResponse(BaseModel):
    status: str
    models_loaded: bool
    products: int
    images: int


class StatsResponse(BaseModel):
    products: int
    images: int
    index: str
    dim: int | None
    searches: int
    writes: int
    uptime_s: float
    search_ms_p50: float | None
    search_ms_p95: float | None


class DeleteResponse(BaseModel):
    product_id: str
    removed_images: int


class TuneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    options: dict[str, str | int | float] = Field(
        default_factory=dict, description="tuning options, as `lookalike tune --option` (views, epochs, ...)"
    )


class TuneStatus(BaseModel):
    state: Literal["idle", "running", "done", "failed"]
    stage: str | None = None  # crops, views, training, re-embedding
    done: int = 0
    total: int | None = None
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class TuneJob:
    """The catalog's one tuning job at a time, run in a background thread; searches go on meanwhile
    with the old vectors, which are swapped for the tuned ones in one transaction at the end."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.lock = threading.Lock()
        self.status = TuneStatus(state="idle")

    def start(self, options: dict[str, str]) -> TuneStatus:
        with self.lock:
            if self.status.state == "running":
                raise HTTPException(409, "a tuning job is already running: GET /tune for its progress")
            self.status = TuneStatus(state="running", started=time.time())
        threading.Thread(target=self._run, args=(options,), daemon=True, name="lookalike-tune").start()
        return self.status

    def _progress(self, stage: str, done: int, total: int | None) -> None:
        with self.lock:
            self.status = self.status.model_copy(update={"stage": stage, "done": done, "total": total})

    def _run(self, options: dict[str, str]) -> None:
        try:
            result = self.catalog.tune(options, progress=self._progress)
            update = {"state": "done", "result": result}
        except Exception as e:  # reported through GET /tune, never lost in a thread
            message = str(e) if isinstance(e, LookalikeError) else f"internal error ({type(e).__name__}: {e})"
            update = {"state": "failed", "error": message[:MAX_MESSAGE]}
        with self.lock:
            self.status = self.status.model_copy(update={**update, "finished": time.time()})


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 503)}
READ_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422)}


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
            "box": {
                "type": "string",
                "pattern": BOX_PATTERN,
                "description": "box index, 'whole', x1,y1,x2,y2, or blank (automatic)",
            },
            # an object in a multipart body is sent as a JSON part (OpenAPI's default encoding)
            "rank": {"type": "string", "enum": list(RANKS), "default": DEFAULT_RANK},
            "where": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": 'metadata filters, e.g. {"brand": "nike"}',
            },
        },
    },
    SearchRequest,
)
PRODUCT_BODY = _form_or_json(
    {
        "required": ["product_id"],
        "anyOf": [{"required": ["images"]}, {"required": ["image_url"]}],  # at least one image
        "properties": {
            "product_id": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"},
            "metadata": {"type": "object", "description": "product metadata, returned with results"},
            "images": {"type": "array", "minItems": 1, "maxItems": 20, "items": {"type": "string", "format": "binary"}},
            "image_url": {
                "type": "array",
                "minItems": 1,
                "maxItems": 20,
                "items": {"type": "string", "maxLength": MAX_URL, "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://"},
            },
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


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
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
            return await _error(413, str(BodyTooLarge(limit)), {"Connection": "close"})(scope, receive, send)
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
                await _error(413, str(e), {"Connection": "close"})(scope, receive, send)


def create_app(catalog_dir: str | Path, settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings.from_env()
    limits = Limits(
        max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels, timeout_s=settings.url_timeout_s,
        allow_private_urls=settings.allow_private_urls,
    )  # fmt: skip
    catalog = Catalog.open(catalog_dir, threads=settings.threads, limits=limits)
    stats = Stats()
    bearer = HTTPBearer(auto_error=False)
    # Inference and URL fetches get their own capacity, so a crowd of slow sources or heavy searches
    # never takes the thread pool that /health and the product reads run in.
    inference = anyio.CapacityLimiter(settings.max_searches)
    url_slots = threading.BoundedSemaphore(settings.max_url_fetches)
    url_threads = anyio.CapacityLimiter(settings.max_url_fetches)
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
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        headers = dict(e.headers or {})  # e.g. Retry-After on a 503
        if e.status_code == 405:  # every route on this path, not only the first one that matched
            allowed = {m for r in app.routes if r.path_regex.match(request.url.path) for m in r.methods or ()}
            headers["Allow"] = ", ".join(sorted(allowed))
        if e.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return _error(e.status_code, str(e.detail), headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(e).__name__})")

    def body_limit(method: str, path: str, content_type: str) -> int:
        is_form = content_type.split(";")[0].strip().lower() in FORM_TYPES
        if method == "POST" and path == "/search" and is_form:
            return settings.max_upload_bytes + SMALL_BODY
        if method == "POST" and path == "/products" and is_form:
            return settings.max_upload_bytes * settings.max_images_per_product + SMALL_BODY
        return SMALL_BODY

    app.add_middleware(BodyLimit, limit_for=body_limit)

    # -- auth ------------------------------------------------------------------------------------
    def check_token(credentials: HTTPAuthorizationCredentials | None) -> None:
        if settings.token is None:
            raise HTTPException(403, "writes are disabled: start the server with LOOKALIKE_API_TOKEN set")
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token")

    def writer(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        check_token(credentials)

    # reads carry a security requirement in the OpenAPI document only when they really need the token
    read_deps = [Depends(writer)] if settings.protect_reads else []

    # -- reads -----------------------------------------------------------------------------------
    async def upload_bytes(value: Any, field: str) -> bytes:
        if not isinstance(value, UploadFile):
            raise HTTPException(422, f"{field}: expected a file upload")
        data = await value.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"{field}: upload over the {settings.max_upload_bytes}-byte limit")
        return data

    async def form(request: Request, single: tuple[str, ...]):
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

    async def fetch(url: str) -> bytes:
        """A URL's bytes, in one of a bounded number of slots: when all are busy the client is told to
        come back (503) at once, rather than queueing behind slow sources."""
        if not url_slots.acquire(blocking=False):
            raise HTTPException(503, "too many image URLs being fetched; retry shortly", {"Retry-After": "1"})
        try:
            return await anyio.to_thread.run_sync(catalog.fetch, url, limiter=url_threads)
        finally:
            url_slots.release()

    @app.post("/search", response_model=SearchResult, responses=ERRORS, openapi_extra=SEARCH_BODY,
              dependencies=read_deps)  # fmt: skip
    async def search(request: Request) -> Any:
        """Search with an uploaded photo (multipart field `image`) or a photo URL (JSON `url`)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in FORM_TYPES:
            data = await form(request, ("image", "k", "box", "where", "rank"))
            rank = data.get("rank", DEFAULT_RANK)
            if rank not in RANKS:
                raise HTTPException(422, f"rank: expected one of {', '.join(RANKS)}")
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
            source, k, where, rank = await fetch(body.url), body.k, body.where, body.rank
            box = body.box.model_dump() if isinstance(body.box, BoxModel) else body.box
            if isinstance(box, str):
                box = parse_box(box)
        else:
            raise HTTPException(415, "send multipart/form-data with an `image` file, or JSON with a `url`")
        result = await anyio.to_thread.run_sync(catalog.search, source, k, where, box, rank, limiter=inference)
        stats.search(result.query.took_ms)
        return result.to_dict()

    def product_response(product: dict) -> dict:
        pid = product["product_id"]
        images = [
            {"n": n, "image": img, "href": f"/products/{pid}/image/{n}"} for n, img in enumerate(product["images"])
        ]
        return {"product_id": pid, "metadata": product["metadata"], "images": images}

    @app.get("/products/{product_id}", response_model=ProductResponse, responses=READ_ERRORS,
             dependencies=read_deps)  # fmt: skip
    def get_product(product_id: str) -> Any:
        product = catalog.product(product_id)
        if product is None:
            raise HTTPException(404, f"no product {product_id!r}")
        return product_response(product)

    image_responses = {**READ_ERRORS, 200: {"content": {"image/*": {}}}, 307: {"description": "the image's URL"}}

    @app.get("/products/{product_id}/image/{n}", dependencies=read_deps, responses=image_responses)
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
        return FileResponse(image, media_type=_image_type(image))

    @app.get("/health", response_model=HealthResponse, responses={413: {"model": ErrorResponse}})
    def health() -> dict:
        info = catalog.info()
        return {"status": "ok", "models_loaded": catalog.models_loaded(), "products": info["products"],
                "images": info["images"]}  # fmt: skip

    @app.get("/stats", dependencies=read_deps, response_model=StatsResponse, responses=READ_ERRORS)
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
            data = await form(request, ("product_id", "metadata"))
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
            product_id, metadata, images = body.product_id, body.metadata, list(body.image_urls)
        else:
            raise HTTPException(415, "send multipart/form-data or JSON")
        if not images:
            raise HTTPException(422, "a product needs at least one image (`images` uploads or `image_url`)")
        most = settings.max_images_per_product
        if sum(isinstance(i, bytes) for i in images) > most or sum(isinstance(i, str) for i in images) > most:
            raise HTTPException(422, f"at most {most} uploaded images and {most} image URLs per product")
        urls = any(isinstance(i, str) for i in images)
        if urls and not url_slots.acquire(blocking=False):
            raise HTTPException(503, "too many image URLs being fetched; retry shortly", {"Retry-After": "1"})
        try:
            product = await anyio.to_thread.run_sync(catalog.add_product, product_id.strip(), images, metadata,
                                                     limiter=inference)  # fmt: skip
        finally:
            if urls:
                url_slots.release()
        with stats.lock:
            stats.writes += 1
        return product_response(product)

    tuning = TuneJob(catalog)

    @app.post("/tune", status_code=202, response_model=TuneStatus, dependencies=[Depends(writer)],
              responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 413, 422)})  # fmt: skip
    def start_tuning(body: TuneRequest) -> Any:
        """Adapt the embedder to this catalog's products (needs lookalike[tune] on the server), then
        re-embed the catalog; poll GET /tune for progress."""
        options = {k: str(v) for k, v in body.options.items()}
        Catalog.check_tune_options(options)  # a bad option is a 400 now, not a failed job later
        return tuning.start(options)

    @app.get("/tune", response_model=TuneStatus, dependencies=read_deps, responses=READ_ERRORS)
    def tuning_status() -> Any:
        """The tuning job's state, stage and progress, and its result when done."""
        return tuning.status

    @app.delete("/products/{product_id}", response_model=DeleteResponse, dependencies=[Depends(writer)],
                responses={code: {"model": ErrorResponse} for code in (401, 403, 404, 413, 422)})  # fmt: skip
    def delete_product(product_id: str) -> dict:
        removed = catalog.remove([product_id])
        if not removed:
            raise HTTPException(404, f"no product {product_id!r}")
        with stats.lock:
            stats.writes += 1
        return {"product_id": product_id, "removed_images": removed}

    return app


def _image_type(path: str) -> str:
    """The served image's type from its first bytes (uploads have no file extension)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return Image.MIME.get(img.format or "", "application/octet-stream")
    except OSError:
        return "application/octet-stream"


def serve(catalog_dir: str, host: str = "127.0.0.1", port: int = 8000, settings: ApiSettings | None = None) -> None:
    import uvicorn

    app = create_app(catalog_dir, settings)
    app.state.catalog.warm_up()
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
