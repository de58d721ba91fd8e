"""POST /tune starts the catalog's one tuning job (a write); GET /tune reports its progress (a read)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from lookalike.api.schemas import READ_ERRORS, ErrorResponse, TuneRequest, TuneStatus
from lookalike.api.service import Service, service, writer
from lookalike.pipeline import Catalog


def writes() -> APIRouter:
    api = APIRouter(dependencies=[Depends(writer)])

    @api.post("/tune", status_code=202, response_model=TuneStatus,
              responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 413, 422)})  # fmt: skip
    def start_tuning(body: TuneRequest, svc: Service = Depends(service)) -> Any:  # noqa: B008
        """Adapt the embedder to this catalog's products (needs lookalike[tune] on the server), then
        re-embed the catalog; poll GET /tune for progress."""
        options = {k: str(v) for k, v in body.options.items()}
        Catalog.check_tune_options(options)  # a bad option is a 400 now, not a failed job later
        return svc.tuning.start(options)

    return api


def reads(reads: list) -> APIRouter:
    api = APIRouter(dependencies=reads)

    @api.get("/tune", response_model=TuneStatus, responses=READ_ERRORS)
    def tuning_status(svc: Service = Depends(service)) -> Any:  # noqa: B008
        """The tuning job's state, stage and progress, and its result when done."""
        return svc.tuning.status

    return api
