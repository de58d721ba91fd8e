"""POST /feedback: a shopper's click, purchase or "not this" on a logged search's result (a write: it
changes what tuning learns)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from lookalike.api.schemas import ErrorResponse, FeedbackRequest, FeedbackResponse
from lookalike.api.service import Service, service, writer
from lookalike.errors import FeedbackRefused


def writes() -> APIRouter:
    api = APIRouter(dependencies=[Depends(writer)])

    @api.post("/feedback", status_code=201, response_model=FeedbackResponse,
              responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422)})  # fmt: skip
    def give_feedback(body: FeedbackRequest, svc: Service = Depends(service)) -> Any:  # noqa: B008
        """Record what the shopper did with one of a search's results. The search must be kept by the
        search log (the catalog keeps searches only when the shop turned the log on): an unknown or
        expired search or an unknown product is a 404, a product that search did not show a 422."""
        try:
            feedback_id = svc.catalog.feedback(body.search_id, body.product_id, body.kind)
        except FeedbackRefused as e:
            raise HTTPException(404 if e.missing else 422, str(e)) from None
        svc.stats.wrote()
        return FeedbackResponse(feedback_id=feedback_id, **body.model_dump())

    return api
