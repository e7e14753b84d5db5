"""Learning from the user: feedback on answers, training jobs and their progress.

No `from __future__ import annotations` here: FastAPI must see real types on route parameters, or it silently
turns `Request` into a query parameter.
"""

from typing import Any

import trio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from node.api.common import ApiError, check_auth, check_changes, data_file, db_limiter, node_of, parse_body
from node.api.node_schema import FeedbackRequest, TrainRequest
from node.training.feedback import GOOD_RATING, UnknownCompletionError
from node.training.service import NothingToLearn, TrainingBusy

router = APIRouter()


@router.post("/v1/feedback")
async def feedback(request: Request) -> Any:
    """Rate a recent chat answer (1-5) and/or give the answer you wanted; `mirador train --from-feedback` uses it."""
    check_changes(request)
    node = node_of(request)
    req = await parse_body(request, FeedbackRequest)
    try:
        feedback_id = await trio.to_thread.run_sync(
            node.feedback.add_feedback, req.completion_id, req.rating, req.correction, limiter=db_limiter
        )
    except UnknownCompletionError as exc:
        raise ApiError(404, str(exc), param="completion_id", code="completion_not_found") from None
    learns = req.correction is not None or (req.rating or 0) >= GOOD_RATING
    return {"object": "feedback", "id": feedback_id, "completion_id": req.completion_id, "used_for_training": learns}


@router.post("/v1/train")
async def start_training(request: Request) -> Any:
    """Start a training job (202); poll `GET /v1/train/{id}` for progress."""
    check_changes(request)
    node = node_of(request)
    req = await parse_body(request, TrainRequest)
    data = data_file(request, req.data) if req.data is not None else None
    try:
        run = node.training.start(req.adapter, req.config(), data, req.from_feedback)
    except TrainingBusy as exc:
        raise ApiError(409, str(exc), code="training_busy") from None
    except NothingToLearn as exc:
        raise ApiError(400, str(exc), param="from_feedback", code="no_feedback") from None
    return JSONResponse(run.to_json(), 202, headers={"Location": f"/v1/train/{run.id}"})


@router.get("/v1/train/{run_id}")
async def training_status(request: Request, run_id: str) -> Any:
    """Progress (step, loss, ETA) and, once done, the result and the installed version."""
    check_auth(request)
    run = node_of(request).training.runs.get(run_id)
    if run is None:
        raise ApiError(404, f"no training job {run_id!r} on this node (since it started)", code="not_found")
    return run.to_json()
