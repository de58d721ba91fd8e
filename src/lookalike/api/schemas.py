"""Request bodies and the API's own answers (a search answers with the pipeline's `SearchResult`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Json, WithJsonSchema

from lookalike.pipeline import DEFAULT_RANK, RANKS

MAX_K = 100
MAX_URL = 2048
MIN_SCORE = (
    "return the products scoring at least this even when the photo is under the catalog's no-match threshold "
    "(no_match is still reported), e.g. 0 for the closest products anyway; default: none under the threshold"
)


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


def _blank_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _json_text(kind: Any, schema: dict) -> Any:
    """A form field holding a JSON object (blank: none); documented as the object itself, which a
    multipart body carries as a JSON part (OpenAPI's default encoding)."""
    return Annotated[Json[kind] | None, BeforeValidator(_blank_is_none), WithJsonSchema(schema)]


WHERE_HELP = 'metadata filters, e.g. {"brand": "nike", "price": "..100"} (LOW..HIGH: a numeric range)'
WhereText = _json_text(dict[str, str], {"type": "object", "additionalProperties": {"type": "string"},
                                        "description": WHERE_HELP})  # fmt: skip
MetadataText = _json_text(dict[str, Any], {"type": "object", "description": "product metadata, returned with results"})


# -- schemas ----------------------------------------------------------------------------------
class BoxModel(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float
    score: float = 1.0
    label: str = "manual"


COLLAPSE = (
    "a metadata key, e.g. item_group_id: one result per value of it (the best of a model's variants); "
    "products without the key are results of their own"
)


class SearchForm(BaseModel):
    """POST /search as multipart form data: the photo as an upload."""

    model_config = ConfigDict(extra="forbid")
    image: UploadFile = Field(description="the shopper's photo")
    k: int = Field(10, ge=1, le=MAX_K)
    box: str | None = Field(  # read by BoxChoice.parse, whose message is the CLI's (the pattern is for the document)
        None,
        description="box index, 'whole', x1,y1,x2,y2, or blank (automatic)",
        json_schema_extra={"pattern": BOX_PATTERN},
    )
    where: WhereText = None
    rank: Literal[RANKS] = Field(DEFAULT_RANK)  # type: ignore[valid-type]
    min_score: float = Field(None, ge=-1, le=1, description=MIN_SCORE)  # a form field is never null
    collapse: str = Field(None, min_length=1, max_length=100, description=COLLAPSE)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: HttpUrlText = Field(description="http(s) URL of the photo (public addresses only)")
    k: int = Field(10, ge=1, le=MAX_K)
    box: int | str | BoxModel | None = Field(
        None, description="detected box index, 'whole', or a box in pixels; default: automatic"
    )
    where: dict[str, str] | None = Field(
        None,
        description="metadata filters: a value compared without case, or LOW..HIGH a numeric range "
        '(either end may be left out), e.g. {"brand": "nike", "price": "..100"}',
    )
    rank: Literal[RANKS] = Field(  # type: ignore[valid-type]
        DEFAULT_RANK, description="a product's score: its best image, or the mean of its best 2 or 3"
    )
    min_score: float | None = Field(None, ge=-1, le=1, description=MIN_SCORE)
    collapse: str | None = Field(None, min_length=1, max_length=100, description=COLLAPSE)


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
    product_id: str = Field(min_length=1, max_length=200, pattern=r"\S")
    metadata: dict[str, Any] = Field(default_factory=dict)
    image_urls: list[HttpUrlText] = Field(min_length=1, max_length=20)


class ProductForm(BaseModel):
    """POST /products as multipart form data: uploads and/or URLs, metadata as a JSON object."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"anyOf": [{"required": ["images"]}, {"required": ["image_url"]}]}
    )
    product_id: str = Field(min_length=1, max_length=200, pattern=r"\S")
    metadata: MetadataText = None
    images: list[UploadFile] = Field(default_factory=list, min_length=1, max_length=20)
    image_url: list[HttpUrlText] = Field(default_factory=list, min_length=1, max_length=20)


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


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    search_id: str = Field(min_length=1, max_length=100, description="the search_id a search answered with")
    product_id: str = Field(min_length=1, max_length=200, pattern=r"\S", description="one of that search's results")
    kind: Literal["click", "purchase", "not_this"] = Field(
        description="click: the shopper opened it; purchase: bought it; not_this: said it is not the shoe"
    )


class FeedbackResponse(BaseModel):
    feedback_id: int
    search_id: str
    product_id: str
    kind: str


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 503)}
READ_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422)}


def also_as_form(form: type[BaseModel]) -> dict:
    """OpenAPI extra for the JSON route of an endpoint: its form twin (excluded from the document, since
    OpenAPI has one operation per path and method) is the same operation's multipart body."""
    schema = form.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"content": {"multipart/form-data": {"schema": schema}}}}
