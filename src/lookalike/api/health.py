"""GET /health (always open, for probes) and GET /stats (a read)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from lookalike.api.schemas import READ_ERRORS, ErrorResponse, HealthResponse, StatsResponse
from lookalike.api.service import Service, service


def health() -> APIRouter:
    api = APIRouter()

    @api.get("/health", response_model=HealthResponse, responses={413: {"model": ErrorResponse}})
    def get_health(svc: Service = Depends(service)) -> dict:  # noqa: B008
        info = svc.catalog.info()
        return {"status": "ok", "models_loaded": svc.catalog.models_loaded(), "products": info["products"],
                "images": info["images"]}  # fmt: skip

    return api


def stats(reads: list) -> APIRouter:
    api = APIRouter(dependencies=reads)

    @api.get("/stats", response_model=StatsResponse, responses=READ_ERRORS)
    def get_stats(svc: Service = Depends(service)) -> dict:  # noqa: B008
        info = svc.catalog.info()
        return {"products": info["products"], "images": info["images"], "index": info["index"], "dim": info["dim"],
                **svc.stats.snapshot()}  # fmt: skip

    return api
