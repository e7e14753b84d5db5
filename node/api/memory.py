"""The node's memory over HTTP (/v1/memory...) and OpenAI's /v1/embeddings.

Memory is private: every /v1/memory route needs the home's API token (as state-changing routes do), reading too.
No `from __future__ import annotations` here: FastAPI must see real types on route parameters.
"""

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec
import numpy as np
import trio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from node.api.common import ApiError, check_auth, check_changes, node_of, parse_body
from node.api.memory_schema import (
    AddMemoriesRequest,
    EmbeddingsRequest,
    ForgetRequest,
    ImportRequest,
    NamespaceSettingsRequest,
    SearchMemoryRequest,
)
from node.api.openai_schema import error_body
from node.memory.embedder import Embedder
from node.memory.record import DEFAULT_NAMESPACE, Memory, MemoryRefused, check_namespace
from node.memory.service import MemoryService, NewMemory

router = APIRouter()
memory_limiter = trio.CapacityLimiter(2)  # worker threads on the memory store and the embedding model at once
T = TypeVar("T")


def memory_of(request: Request) -> MemoryService:
    """The node's memory, or 503 when `[memory] enabled = false` or it could not start."""
    memory = node_of(request).memory
    if memory is None:
        raise ApiError(
            503, "memory is off on this node ([memory] enabled = false)", code="memory_disabled", type_="server_error"
        )
    return memory


async def in_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking memory call in a worker thread; a refusal becomes a 400 (404 for an unknown id)."""
    try:
        return await trio.to_thread.run_sync(lambda: call(*args, **kwargs), limiter=memory_limiter)
    except MemoryRefused as exc:
        if exc.reason == "indexing":
            raise ApiError(
                503, exc.detail, code="memory_indexing", type_="server_error", headers={"Retry-After": "60"}
            ) from None
        status = 404 if exc.reason == "not_found" else 400
        raise ApiError(status, exc.detail, code=f"memory_{exc.reason}") from None


def memory_json(m: Memory, score: float | None = None) -> dict[str, Any]:
    """A memory as the API shows it."""
    out: dict[str, Any] = {"object": "memory", **msgspec.to_builtins(m)}
    if score is not None:
        out["score"] = score
    return out


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Any:
    """OpenAI embeddings from the node's sentence-embedding model (384 dimensions, unit length)."""
    check_auth(request)
    memory = memory_of(request)
    req = await parse_body(request, EmbeddingsRequest)
    if req.dimensions is not None and req.dimensions != Embedder.dimensions:  # the class: loading is not for the loop
        raise ApiError(400, f"this node's embeddings have {Embedder.dimensions} dimensions", param="dimensions")
    texts = req.texts()

    def run() -> tuple[np.ndarray, int]:
        vectors = memory.embed(texts)
        return vectors, sum(memory.embedder.count_tokens(t) for t in texts)

    vectors, tokens = await in_thread(run)
    data = []
    for i, v in enumerate(vectors):
        value: Any = (
            base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": Embedder.model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@router.post("/v1/memory")
async def add_memories(request: Request) -> Any:
    """Remember notes, documents' chunks or corrections in a namespace."""
    check_changes(request)
    memory = memory_of(request)
    req = await parse_body(request, AddMemoriesRequest)
    items = [NewMemory(text=i.text, kind=i.kind, source=i.source, position=i.position) for i in req.items]
    added = await in_thread(memory.add, req.namespace, items)
    return {"object": "list", "data": [memory_json(m) for m in added]}


@router.get("/v1/memory")
async def list_memories(
    request: Request, namespace: str = DEFAULT_NAMESPACE, offset: str | None = None, limit: int = 100
) -> Any:
    """A page of a namespace's memories; `next` is the offset of the following page."""
    check_changes(request)
    memory = memory_of(request)
    page, following = await in_thread(memory.page, namespace, offset, limit)
    return {"object": "list", "data": [memory_json(m) for m in page], "next": following}


@router.get("/v1/memory/namespaces")
async def namespaces(request: Request) -> Any:
    """Every namespace, how many memories it holds, whether it remembers chats."""
    check_changes(request)
    memory = memory_of(request)
    return {"object": "list", "data": await in_thread(memory.namespaces)}


@router.post("/v1/memory/namespaces/{namespace}")
async def configure_namespace(request: Request, namespace: str) -> Any:
    """Turn remembering chats on or off in one namespace."""
    check_changes(request)
    memory = memory_of(request)
    req = await parse_body(request, NamespaceSettingsRequest)
    settings = await in_thread(memory.configure, namespace, chats=req.chats)
    return {"namespace": namespace, **msgspec.to_builtins(settings)}


@router.post("/v1/memory/search")
async def search_memories(request: Request) -> Any:
    """The best memories for a query: hybrid (dense + BM25, RRF), decayed by last use, diversified (MMR)."""
    check_changes(request)
    memory = memory_of(request)
    req = await parse_body(request, SearchMemoryRequest)
    hits = await in_thread(
        memory.search,
        req.namespace,
        req.query,
        req.limit,
        mode=req.mode,
        decay=req.decay,
        diverse=req.diverse,
        min_similarity=req.min_similarity,
    )
    return {"object": "list", "data": [memory_json(h.memory, h.score) for h in hits]}


@router.post("/v1/memory/forget")
async def forget(request: Request) -> Any:
    """Forget by ids, source or age, or a whole namespace; what is forgotten is removed from disk."""
    check_changes(request)
    memory = memory_of(request)
    req = await parse_body(request, ForgetRequest)
    if req.everything:
        if req.ids or req.source or req.before is not None:
            raise ApiError(400, "'everything' forgets the whole namespace: give no other condition", param="everything")
        count = await in_thread(memory.drop, req.namespace)
    elif req.ids is None and req.source is None and req.before is None:
        raise ApiError(400, "say what to forget: ids, source, before, or everything", param="ids")
    else:
        count = await in_thread(memory.forget, req.namespace, ids=req.ids, source=req.source, before=req.before)
    return {"object": "memory.forget", "namespace": req.namespace, "forgotten": count}


@router.get("/v1/memory/export")
async def export(request: Request, namespace: str = DEFAULT_NAMESPACE) -> Any:
    """Every memory of a namespace as JSON lines (text and provenance; vectors are recomputed on import)."""
    check_changes(request)
    memory = memory_of(request)
    await in_thread(check_namespace, namespace)  # refused before the stream starts

    async def body() -> AsyncIterator[str]:
        offset: str | None = None
        try:
            while True:
                page, offset = await in_thread(memory.page, namespace, offset, 500)
                for m in page:
                    yield json.dumps(msgspec.to_builtins(m), ensure_ascii=False) + "\n"
                if offset is None:
                    return
        except ApiError as exc:  # the stream has begun: its last line says it is incomplete
            yield json.dumps(error_body(exc.message, exc.type, code=exc.code)) + "\n"

    return StreamingResponse(body(), media_type="application/x-ndjson")


@router.post("/v1/memory/import")
async def import_memories(request: Request) -> Any:
    """Store exported memories (ids, times and provenance kept)."""
    check_changes(request)
    memory = memory_of(request)
    req = await parse_body(request, ImportRequest)
    try:
        memories = [msgspec.convert(m, Memory) for m in req.memories]
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"not an exported memory: {exc}", param="memories") from None
    count = await in_thread(memory.import_memories, memories)
    return {"object": "memory.import", "imported": count}


@router.get("/v1/memory/{memory_id}")
async def show_memory(request: Request, memory_id: str, namespace: str = DEFAULT_NAMESPACE) -> Any:
    """One memory by id."""
    check_changes(request)
    memory = memory_of(request)
    return memory_json(await in_thread(memory.get, namespace, memory_id))
