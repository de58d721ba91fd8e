"""The FastAPI app: the shared service, the error handlers and body limits, and the routers."""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI

from lookalike.api import errors, feedback, gate, health, products, search, tuning
from lookalike.api.bodies import FORM_TYPES
from lookalike.api.service import SMALL_BODY, Service, writer
from lookalike.api.settings import ApiSettings
from lookalike.pipeline import Catalog


def create_app(catalog_dir: str | Path, settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings.from_env()
    catalog = Catalog.open(catalog_dir, threads=settings.threads, limits=settings.limits)
    app = FastAPI(
        title="lookalike",
        version="0.1.0",
        description="Visual product search for shoe catalogs: send a photo, get the most similar products.",
    )
    app.state.service = Service(catalog, settings)
    errors.install(app)

    def body_limit(method: str, path: str, media_type: str) -> int:
        is_form = media_type in FORM_TYPES
        if method == "POST" and path == "/search" and is_form:
            return settings.max_upload_bytes + SMALL_BODY
        if method == "POST" and path == "/products" and is_form:
            return settings.max_upload_bytes * settings.max_images_per_product + SMALL_BODY
        return SMALL_BODY

    app.add_middleware(gate.BodyLimit, limit_for=body_limit)
    app.add_middleware(gate.TokenFirst, api=app, settings=settings)  # outermost: the token before all else
    # reads carry a security requirement in the OpenAPI document only when they really need the token
    reads = [Depends(writer)] if settings.protect_reads else []
    for router in (*search.router(reads), products.reads(reads), health.health(), health.stats(reads),
                   *products.writes(settings), tuning.writes(), tuning.reads(reads), feedback.writes()):  # fmt: skip
        app.include_router(router)
    return app


def serve(catalog_dir: str, host: str = "127.0.0.1", port: int = 8000, settings: ApiSettings | None = None) -> None:
    import uvicorn

    app = create_app(catalog_dir, settings)
    app.state.service.catalog.warm_up()
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
