"""Learning from the user: feedback on answers, training jobs and their progress.

No `from __future__ import annotations` here: FastAPI must see real types on route parameters, or it silently
turns `Request` into a query parameter.
"""

import logging
from typing import Any

import trio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from node.api.common import ApiError, check_auth, check_changes, data_file, db_limiter, node_of, parse_body
from node.api.memory import in_thread, memory_of
from node.api.node_schema import FeedbackRequest, TrainRequest
from node.memory.record import MAX_TEXT_CHARS
from node.memory.service import MemoryService, NewMemory
from node.memory.training import memory_records
from node.state import NodeState
from node.training.feedback import GOOD_RATING, UnknownCompletionError
from node.training.service import NothingToLearn, TrainingBusy

router = APIRouter()
log = logging.getLogger(__name__)


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
    remembered = None
    if req.correction is not None and node.memory is not None:
        remembered = await _remember_correction(node.memory, node, req.completion_id, req.correction)
    return {
        "object": "feedback",
        "id": feedback_id,
        "completion_id": req.completion_id,
        "used_for_training": learns,
        "memory_id": remembered,  # the correction, remembered in the chat's namespace
    }


async def _remember_correction(
    memory: MemoryService, node: NodeState, completion_id: str, correction: str
) -> str | None:
    """Remember a correction in the namespace the corrected chat used (not when memory was off for it)."""
    namespace, question = await trio.to_thread.run_sync(
        node.feedback.completion_memory, completion_id, limiter=db_limiter
    )
    if namespace is None:
        return None
    text = f"User: {question.strip()}\nCorrect answer: {correction.strip()}"[:MAX_TEXT_CHARS]
    item = NewMemory(text=text, kind="correction", source=completion_id)
    try:
        (added,) = await in_thread(memory.add, namespace, [item])
    except ApiError as exc:  # the feedback itself is stored: answer for it, say nothing was remembered
        log.warning("memory: correction of %s not remembered: %s", completion_id, exc.message)
        return None
    return added.id


@router.post("/v1/train")
async def start_training(request: Request) -> Any:
    """Start a training job (202); poll `GET /v1/train/{id}` for progress."""
    check_changes(request)
    node = node_of(request)
    req = await parse_body(request, TrainRequest)
    data = data_file(request, req.data) if req.data is not None else None
    memory = None
    if req.from_memory is not None:
        memory = (req.from_memory, await _memory_records(request, req.from_memory))
    try:
        run = node.training.start(req.adapter, req.config(), data, req.from_feedback, memory=memory)
    except TrainingBusy as exc:
        raise ApiError(409, str(exc), code="training_busy") from None
    except NothingToLearn as exc:
        param = "from_memory" if memory is not None else "from_feedback"
        raise ApiError(400, str(exc), param=param, code="nothing_to_learn" if memory else "no_feedback") from None
    return JSONResponse(run.to_json(), 202, headers={"Location": f"/v1/train/{run.id}"})


async def _memory_records(request: Request, namespace: str) -> list[dict[str, Any]]:
    """Training records from a namespace's memories (corrections and well-rated exchanges first)."""
    node = node_of(request)
    memory = memory_of(request)
    ratings = await trio.to_thread.run_sync(node.feedback.ratings, limiter=db_limiter)
    return await in_thread(lambda: memory_records(memory.all(namespace), ratings))


@router.get("/v1/train/{run_id}")
async def training_status(request: Request, run_id: str) -> Any:
    """Progress (step, loss, ETA) and, once done, the result and the installed version."""
    check_auth(request)
    run = node_of(request).training.runs.get(run_id)
    if run is None:
        raise ApiError(404, f"no training job {run_id!r} on this node (since it started)", code="not_found")
    return run.to_json()
