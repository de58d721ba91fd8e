"""Products: GET /products/{id} and its images (reads); POST /products and DELETE /products/{id} (writes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse

from lookalike.api.bodies import content_type, form, json_body, require_url, upload_bytes
from lookalike.api.schemas import (
    ERRORS,
    FORM_TYPES,
    PRODUCT_BODY,
    READ_ERRORS,
    DeleteResponse,
    ErrorResponse,
    ProductRequest,
    ProductResponse,
)
from lookalike.api.service import Service, service, writer
from lookalike.pipeline import ImageSource

IMAGE_RESPONSES = {**READ_ERRORS, 200: {"content": {"image/*": {}}}, 307: {"description": "the image's URL"}}


def reads(reads: list) -> APIRouter:
    api = APIRouter(dependencies=reads)

    @api.get("/products/{product_id}", response_model=ProductResponse, responses=READ_ERRORS)
    def get_product(product_id: str, svc: Service = Depends(service)) -> Any:  # noqa: B008
        return _response(_product(svc, product_id))

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


def writes() -> APIRouter:
    api = APIRouter(dependencies=[Depends(writer)])

    @api.post("/products", status_code=201, response_model=ProductResponse, responses=ERRORS,
              openapi_extra=PRODUCT_BODY)  # fmt: skip
    async def put_product(request: Request, svc: Service = Depends(service)) -> Any:  # noqa: B008
        """Add or replace a product: its id, metadata and images (uploads and/or URLs)."""
        kind = content_type(request)
        if kind in FORM_TYPES:
            data = await form(request, ("product_id", "metadata"), svc.settings)
            product_id = data.get("product_id")
            if not isinstance(product_id, str) or not product_id.strip() or len(product_id) > 200:
                raise HTTPException(422, "product_id: required, 1 to 200 characters")
            metadata = _metadata(data.get("metadata"))
            images: list[Any] = [await upload_bytes(f, "images", svc.settings) for f in data.getlist("images")]
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

    @api.delete("/products/{product_id}", response_model=DeleteResponse,
                responses={code: {"model": ErrorResponse} for code in (401, 403, 404, 413, 422)})  # fmt: skip
    def delete_product(product_id: str, svc: Service = Depends(service)) -> dict:  # noqa: B008
        removed = svc.catalog.remove([product_id])
        if not removed:
            raise HTTPException(404, f"no product {product_id!r}")
        svc.stats.wrote()
        return {"product_id": product_id, "removed_images": removed}

    return api


def _product(svc: Service, product_id: str) -> dict:
    product = svc.catalog.product(product_id)
    if product is None:
        raise HTTPException(404, f"no product {product_id!r}")
    return product


def _response(product: dict) -> dict:
    pid = product["product_id"]
    images = [{"n": n, "image": img, "href": f"/products/{pid}/image/{n}"} for n, img in enumerate(product["images"])]
    return {"product_id": pid, "metadata": product["metadata"], "images": images}


def _metadata(text: Any) -> dict:
    """A form's `metadata` field: a JSON object, or blank for none."""
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        metadata = json.loads(text)
    except ValueError:
        raise HTTPException(422, "metadata: expected a JSON object") from None
    if not isinstance(metadata, dict):
        raise HTTPException(422, "metadata: expected a JSON object")
    return metadata


def _image_type(path: str) -> str:
    """The served image's type from its first bytes (uploads have no file extension)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return Image.MIME.get(img.format or "", "application/octet-stream")
    except OSError:
        return "application/octet-stream"
