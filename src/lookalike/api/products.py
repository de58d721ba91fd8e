"""Products: GET /products/{id} and its images (reads); POST /products and DELETE /products/{id} (writes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Form, HTTPException, Query
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import Field

from lookalike.api.bodies import FormRoute, JsonRoute, given_once, upload_bytes
from lookalike.api.schemas import (
    ERRORS,
    MAX_K,
    READ_ERRORS,
    DeleteResponse,
    ErrorResponse,
    ProductForm,
    ProductRequest,
    ProductResponse,
    also_as_form,
)
from lookalike.api.service import SMALL_BODY, Service, service, writer
from lookalike.api.settings import ApiSettings
from lookalike.pipeline import DEFAULT_RANK, RANKS, ImageSource, SearchResult

WHERE_PAIR = r"^\s*[^=\s][^=]*="  # a filter in a query string: KEY=VALUE, the key not blank
IMAGE_RESPONSES = {**READ_ERRORS, 200: {"content": {"image/*": {}}}, 307: {"description": "the image's URL"}}


def reads(reads: list) -> APIRouter:
    api = APIRouter(dependencies=reads)

    @api.get("/products/{product_id}", response_model=ProductResponse, responses=READ_ERRORS)
    def get_product(product_id: str, svc: Service = Depends(service)) -> Any:  # noqa: B008
        return _response(_product(svc, product_id))

    @api.get("/products/{product_id}/similar", response_model=SearchResult, responses=ERRORS)
    async def get_similar(product_id: str, svc: Service = Depends(service),  # noqa: B008
                          k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
                          rank: Annotated[Literal[RANKS], Query()] = DEFAULT_RANK,  # type: ignore[valid-type]
                          where: Annotated[list[Annotated[str, Field(pattern=WHERE_PAIR)]] | None,
                                           Query(description="KEY=VALUE (VALUE compared without case, or "
                                                             "LOW..HIGH), repeatable")] = None,
                          ) -> Any:  # fmt: skip
        """More like this: the products most like a catalog product, from its stored vectors."""
        filters = {}
        for pair in where or []:  # each one KEY=VALUE (the pattern)
            key, _, value = pair.partition("=")
            filters[key.strip()] = value.strip()

        def similar() -> dict:
            _product(svc, product_id)  # 404 for an unknown product
            return svc.catalog.similar(product_id, k, filters or None, rank).to_dict()

        return await anyio.to_thread.run_sync(similar, limiter=svc.inference)

    @api.get("/products/{product_id}/image/{n}", responses=IMAGE_RESPONSES)
    def get_product_image(product_id: str, n: int, svc: Service = Depends(service)) -> Any:  # noqa: B008
        product = _product(svc, product_id)
        if not 0 <= n < len(product["images"]):
            raise HTTPException(404, f"product {product_id!r} has {len(product['images'])} image(s); no image {n}")
        image = product["images"][n]
        if ImageSource.of(image).kind == "url":
            return RedirectResponse(image, status_code=307)
        if not Path(image).is_file():
            raise HTTPException(404, f"image {n} of {product_id!r} is no longer on disk")
        return FileResponse(image, media_type=_image_type(image))

    return api


def writes(settings: ApiSettings) -> list[APIRouter]:
    forms = APIRouter(route_class=FormRoute, dependencies=[Depends(writer)])
    jsons = APIRouter(route_class=JsonRoute, dependencies=[Depends(writer)])
    api = APIRouter(dependencies=[Depends(writer)])
    limits = {"max_files": settings.max_images_per_product, "max_fields": 10 + settings.max_images_per_product,
              "max_part_size": SMALL_BODY}  # fmt: skip

    @forms.post("/products", status_code=201, response_model=ProductResponse, include_in_schema=False,
                dependencies=[Depends(given_once(ProductForm))], form_limits=limits)  # fmt: skip
    async def put_product_form(form: Annotated[ProductForm, Form()], svc: Service = Depends(service)) -> Any:  # noqa: B008
        uploads: list[Any] = [await upload_bytes(f, "images", svc.settings) for f in form.images]
        return await _put(svc, form.product_id, uploads + form.image_url, form.metadata or {})

    @jsons.post("/products", status_code=201, response_model=ProductResponse, responses=ERRORS,
                openapi_extra=also_as_form(ProductForm))  # fmt: skip
    async def put_product(body: ProductRequest, svc: Service = Depends(service)) -> Any:  # noqa: B008
        """Add or replace a product: its id, metadata and images (uploads and/or URLs)."""
        return await _put(svc, body.product_id, list(body.image_urls), body.metadata)

    @api.delete("/products/{product_id}", response_model=DeleteResponse,
                responses={code: {"model": ErrorResponse} for code in (401, 403, 404, 413, 422)})  # fmt: skip
    def delete_product(product_id: str, svc: Service = Depends(service)) -> dict:  # noqa: B008
        removed = svc.catalog.remove([product_id])
        if not removed:
            raise HTTPException(404, f"no product {product_id!r}")
        svc.stats.wrote()
        return {"product_id": product_id, "removed_images": removed}

    return [forms, jsons, api]


async def _put(svc: Service, product_id: str, images: list[bytes | str], metadata: dict) -> dict:
    """Both bodies of POST /products: the images are encoded before anything is written."""
    if not images:
        raise HTTPException(422, "a product needs at least one image (`images` uploads or `image_url`)")
    most = svc.settings.max_images_per_product
    if sum(isinstance(i, bytes) for i in images) > most or sum(isinstance(i, str) for i in images) > most:
        raise HTTPException(422, f"at most {most} uploaded images and {most} image URLs per product")
    urls = any(isinstance(i, str) for i in images)
    if urls:
        svc.take_url_slot()
    try:
        product = await anyio.to_thread.run_sync(svc.catalog.add_product, product_id.strip(), images, metadata,
                                                 limiter=svc.inference)  # fmt: skip
    finally:
        if urls:
            svc.url_slots.release()
    svc.stats.wrote()
    return _response(product)


def _product(svc: Service, product_id: str) -> dict:
    product = svc.catalog.product(product_id)
    if product is None:
        raise HTTPException(404, f"no product {product_id!r}")
    return product


def _response(product: dict) -> dict:
    pid = product["product_id"]
    images = [{"n": n, "image": img, "href": f"/products/{pid}/image/{n}"} for n, img in enumerate(product["images"])]
    return {"product_id": pid, "metadata": product["metadata"], "images": images}


def _image_type(path: str) -> str:
    """The served image's type from its first bytes (uploads have no file extension)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return Image.MIME.get(img.format or "", "application/octet-stream")
    except OSError:
        return "application/octet-stream"
