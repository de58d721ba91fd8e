"""Request bodies and the API's own answers (a search answers with the pipeline's `SearchResult`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from lookalike.pipeline import DEFAULT_RANK, RANKS

MAX_K = 100
MAX_URL = 2048


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


# -- OpenAPI for the endpoints that take either multipart form data or a JSON body --------------
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


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
