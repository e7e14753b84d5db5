"""The OpenAI-compatible HTTP API (FastAPI on hypercorn, in the daemon's trio loop).

No `from __future__ import annotations` here: FastAPI must see real types on route parameters, or it silently
turns `Request` into a query parameter.
"""

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import multiaddr
import trio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from libp2p.peer.peerinfo import info_from_p2p_addr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from node.adapters.cache import AdapterRef
from node.adapters.personalities import AUTO, Route, UnknownModelError
from node.adapters.store import UnknownAdapterError
from node.api.common import ApiError, BodyLimitMiddleware, check_auth, node_of, parse_body
from node.api.node_schema import ConnectRequest, FeedbackRequest, TrainRequest
from node.api.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    describe_validation_errors,
    error_body,
)
from node.inference.engine import EngineBusy, EngineShuttingDown, GenerationRequest, Job
from node.p2p.host import P2PError, P2PNode
from node.state import NodeState
from node.training.feedback import GOOD_RATING, UnknownCompletionError
from node.training.service import NothingToLearn, TrainingBusy

log = logging.getLogger(__name__)
PERSONALITY_HEADER = "X-Mirador-Personality"
ADAPTERS_HEADER = "X-Mirador-Adapters"
_tokenize_limiter = trio.CapacityLimiter(2)
_db_limiter = trio.CapacityLimiter(1)


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness: answers as soon as the API is up."""
    node = node_of(request)
    return {"status": "stopping" if node.shutting_down else "ok", "model": node.model.id}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The models this node serves."""
    check_auth(request)
    node = node_of(request)
    created = int(node.model.path.stat().st_mtime)
    data = [{"id": node.model.id, "object": "model", "created": created, "owned_by": "mirador"}]
    for p in node.manifest.personalities():
        data.append(
            {
                "id": p.name,
                "object": "model",
                "created": created,
                "owned_by": "mirador",
                "personality": {"adapters": dict(p.adapters), "load_on": [" ".join(k) for k in p.keywords]},
            }
        )
    return {"object": "list", "data": data}


@router.get("/v1/node/status")
async def node_status(request: Request) -> dict[str, Any]:
    """Node, profile, model and engine status."""
    check_auth(request)
    return node_of(request).status()


def _route(node: NodeState, model: str, message: str | None) -> tuple[Route, tuple[AdapterRef, ...]]:
    try:
        return node.resolve(model, message)
    except UnknownModelError:
        available = ", ".join([*node.model.names(), AUTO, *(p.name for p in node.manifest.personalities())])
        raise ApiError(
            404,
            f"the model '{model}' does not exist on this node; available: {available}, or base:<adapter>",
            param="model",
            code="model_not_found",
        ) from None
    except (UnknownAdapterError, ValueError) as exc:
        raise ApiError(404, str(exc), param="model", code="adapter_not_found") from None


async def _start(
    node: NodeState, tokens: list[int], req: Any, limit: int | None, adapters: tuple[AdapterRef, ...]
) -> Job:
    n_ctx = node.engine.n_ctx
    if len(tokens) >= n_ctx:
        raise ApiError(
            400,
            f"the prompt is {len(tokens)} tokens long; this node's context holds {n_ctx} "
            "(prompt plus completion); shorten the prompt",
            param="messages",
            code="context_length_exceeded",
        )
    cap = node.settings.max_tokens
    gen = GenerationRequest(
        prompt_tokens=tokens,
        sampling=req.sampling(),
        max_tokens=min(limit or cap, cap),
        stop=req.stop_list(),
        stream=req.stream,
        ignore_eos=req.ignore_eos,
        adapters=adapters,
    )
    try:
        return await node.engine.submit(gen, node.config.api.queue_timeout_s)
    except EngineBusy as exc:
        raise ApiError(
            503,
            f"the node is busy: {exc}; retry later",
            code="server_busy",
            type_="server_error",
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    except EngineShuttingDown:
        raise ApiError(
            503, "the node is shutting down", code="shutting_down", type_="server_error", headers={"Retry-After": "5"}
        ) from None


def _usage(job: Job) -> dict[str, int]:
    s = job.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
    }


def _end_error(job: Job) -> dict[str, Any] | None:
    if job.error:
        return error_body(job.error, "server_error", code=job.error_code)
    if job.cut_by_shutdown:
        return error_body(
            f"the node shut down; the response was cut after {job.stats.completion_tokens} tokens",
            "server_error",
            code="shutting_down",
        )
    return None


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def _stream(
    job: Job,
    head: dict[str, Any],
    delta_key: Callable[[str], dict[str, Any]],
    first: dict[str, Any] | None,
    include_usage: bool,
    headers: dict[str, str],
    record: Callable[[str], Awaitable[None]],
) -> StreamingResponse:
    """SSE stream: chunks sharing `head`, each choice built by `delta_key`, then finish, usage, [DONE]."""
    prefix = json.dumps(head, separators=(",", ":"))[:-1] + ',"choices":['

    def chunk(choice: dict[str, Any]) -> str:
        return "data: " + prefix + json.dumps(choice, separators=(",", ":"), ensure_ascii=False) + "]}\n\n"

    async def body() -> AsyncIterator[str]:
        parts: list[str] = []
        try:
            if first is not None:
                yield chunk(first)
            async for delta in job.text():
                parts.append(delta)
                yield chunk(delta_key(delta))
            err = _end_error(job)
            if err is not None:
                yield _sse(err)
            else:
                yield chunk(delta_key("") | {"finish_reason": job.stats.finish_reason})
                if include_usage:
                    yield _sse(head | {"choices": [], "usage": _usage(job)})
            yield "data: [DONE]\n\n"
            await record("".join(parts))
        finally:
            job.cancel()  # the client may have gone away: stop generating

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} | headers,
    )


async def _collect(job: Job) -> str:
    try:
        parts = [delta async for delta in job.text()]
    finally:
        job.cancel()
    err = _end_error(job)
    if err is not None:
        raise ApiError(
            503 if job.cut_by_shutdown else 500,
            err["error"]["message"],
            code=err["error"]["code"],
            type_="server_error",
        )
    return "".join(parts)


class _Admitted(NamedTuple):
    req: Any
    job: Job
    head: dict[str, Any]
    headers: dict[str, str]
    record: Callable[[str], Awaitable[None]]  # remembers a finished chat answer for feedback


async def _admit(request: Request, schema: type[Any], id_prefix: str, obj: str) -> _Admitted:
    """Shared front of both generation routes: auth, schema, routing, tokens, slot."""
    check_auth(request)
    node = node_of(request)
    req = await parse_body(request, schema)
    messages: list[dict[str, str]] | None = None  # only chat answers can get feedback
    if isinstance(req, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        latest = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        chosen, adapters = _route(node, req.model, latest)
        tokens = await trio.to_thread.run_sync(node.model.chat_tokens, messages, limiter=_tokenize_limiter)
    else:
        chosen, adapters = _route(node, req.model, req.text())
        tokens = await trio.to_thread.run_sync(node.model.completion_tokens, req.text(), limiter=_tokenize_limiter)
    job = await _start(node, tokens, req, req.limit(), adapters)
    head = {
        "id": f"{id_prefix}-{uuid.uuid4().hex[:24]}",
        "object": obj,
        "created": int(time.time()),
        "model": req.model,
        "personality": chosen.label,
    }
    headers = {PERSONALITY_HEADER: chosen.label, ADAPTERS_HEADER: ",".join(a.key for a in adapters) or "none"}

    async def record(answer: str) -> None:
        if messages is None or job.error or job.cut_by_shutdown:
            return
        keys = [a.key for a in adapters]
        await trio.to_thread.run_sync(
            node.feedback.record_completion, head["id"], chosen.label, keys, messages, answer, limiter=_db_limiter
        )

    return _Admitted(req, job, head, headers, record)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    """OpenAI chat completions, streamed (SSE) or not."""
    req, job, head, headers, record = await _admit(request, ChatCompletionRequest, "chatcmpl", "chat.completion.chunk")
    if req.stream:
        return _stream(
            job,
            head,
            lambda d: {"index": 0, "delta": {"content": d}, "finish_reason": None},
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
            req.include_usage(),
            headers,
            record,
        )
    text = await _collect(job)
    await record(text)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": job.stats.finish_reason,
        "logprobs": None,
    }
    return JSONResponse(
        head | {"object": "chat.completion", "choices": [choice], "usage": _usage(job)}, headers=headers
    )


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    """OpenAI (legacy) text completions, streamed (SSE) or not."""
    req, job, head, headers, record = await _admit(request, CompletionRequest, "cmpl", "text_completion")
    if req.stream:
        return _stream(
            job,
            head,
            lambda d: {"index": 0, "text": d, "logprobs": None, "finish_reason": None},
            None,
            req.include_usage(),
            headers,
            record,
        )
    text = await _collect(job)
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": job.stats.finish_reason}
    return JSONResponse(head | {"choices": [choice], "usage": _usage(job)}, headers=headers)


def _p2p(node: NodeState) -> P2PNode:
    if node.p2p is None:
        raise ApiError(409, "the P2P host is disabled on this node ([p2p] enabled = false)", code="p2p_disabled")
    return node.p2p


@router.get("/v1/node/peers")
async def node_peers(request: Request) -> dict[str, Any]:
    """This node's peer id, listen addresses and connected peers."""
    check_auth(request)
    node = node_of(request)
    _p2p(node)
    return node.p2p_status()


@router.post("/v1/node/connect")
async def node_connect(request: Request) -> dict[str, Any]:
    """Dial a peer (full multiaddr with /p2p/ID) over Noise."""
    check_auth(request)
    node = node_of(request)
    p2p = _p2p(node)
    req = await parse_body(request, ConnectRequest)
    try:
        info_from_p2p_addr(multiaddr.Multiaddr(req.addr))
    except Exception as exc:  # multiaddr raises several types for malformed text
        raise ApiError(400, f"'addr' is not a full multiaddr with /p2p/PEER_ID: {exc}", param="addr") from None
    try:
        peer = await p2p.connect(req.addr)
    except P2PError as exc:
        raise ApiError(502, str(exc), param="addr", code="peer_unreachable", type_="server_error") from None
    return {"peer_id": str(peer), "peers": node.p2p_status()["peers"]}


@router.post("/v1/feedback")
async def feedback(request: Request) -> Any:
    """Rate a recent chat answer (1-5) and/or give the answer you wanted; `mirador train --from-feedback` uses it."""
    check_auth(request)
    node = node_of(request)
    req = await parse_body(request, FeedbackRequest)
    try:
        feedback_id = await trio.to_thread.run_sync(
            node.feedback.add_feedback, req.completion_id, req.rating, req.correction, limiter=_db_limiter
        )
    except UnknownCompletionError as exc:
        raise ApiError(404, str(exc), param="completion_id", code="completion_not_found") from None
    learns = req.correction is not None or (req.rating or 0) >= GOOD_RATING
    return {"object": "feedback", "id": feedback_id, "completion_id": req.completion_id, "used_for_training": learns}


@router.post("/v1/train")
async def start_training(request: Request) -> Any:
    """Start a training job (202); poll `GET /v1/train/{id}` for progress."""
    check_auth(request)
    node = node_of(request)
    req = await parse_body(request, TrainRequest)
    data = None
    if req.data is not None:
        data = Path(req.data).expanduser().resolve()
        if not data.is_file():
            raise ApiError(400, f"data file {data} does not exist on the node", param="data", code="data_not_found")
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


def create_app(node: NodeState) -> ASGIApp:
    """The ASGI app serving `node`."""
    app = FastAPI(title="Mirador node", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.node = node
    app.include_router(router)
    from node.api.federations import router as fed_router  # these import this module's helpers
    from node.api.market import router as market_router

    app.include_router(market_router)
    app.include_router(fed_router)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(exc.errors()))
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the API")
        return ApiError(500, "internal error (see the node's log)", type_="server_error").response()

    limited: ASGIApp = BodyLimitMiddleware(app, node.config.api.max_body_bytes)
    return limited
