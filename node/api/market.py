"""HTTP routes of the network marketplace: announce, search, pull (progress streamed as JSON lines)."""

import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import trio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from marketplace.artifacts import ArtifactRefused
from marketplace.manifest import NAME_RE
from node.api.common import ApiError, check_auth, check_changes, node_of, parse_body
from node.api.node_schema import AnnounceRequest, PullRequest
from node.market.service import MarketService

router = APIRouter()
log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.25


def _service(request: Request) -> MarketService:
    service: MarketService | None = node_of(request).market
    if service is None:
        raise ApiError(
            409,
            "the network marketplace needs the P2P host and the embedded store ([p2p] enabled, [store] backend = "
            "embedded)",
            code="market_unavailable",
        )
    return service


@router.post("/v1/market/announce")
async def announce(request: Request) -> dict[str, Any]:
    """Announce this node's published versions of a name in the DHT."""
    check_changes(request)
    service = _service(request)
    req = await parse_body(request, AnnounceRequest)
    try:
        return await service.announce(req.name)
    except ArtifactRefused as exc:
        raise ApiError(404, exc.detail, param="name", code="not_published") from None
    except trio.TooSlowError:
        raise ApiError(504, f"announcing {req.name} did not finish in time", code="dht_timeout") from None


@router.get("/v1/market/search")
async def search(request: Request, name: str) -> dict[str, Any]:
    """Every version of `name` announced in the DHT, by any publisher."""
    check_auth(request)
    service = _service(request)
    if not re.fullmatch(NAME_RE, name):
        raise ApiError(400, f"'name' {name!r} is not an artifact name", param="name")
    return {"name": name, "results": await service.search(name)}


@router.post("/v1/market/pull")
async def pull(request: Request) -> StreamingResponse:
    """Pull from peers; the answer is a stream of JSON lines: progress events, then `done` or `error`."""
    check_changes(request)
    service = _service(request)
    req = await parse_body(request, PullRequest)
    send, receive = trio.open_memory_channel[dict[str, Any]](256)
    token = trio.lowlevel.current_trio_token()
    last: dict[str, float] = {}

    def progress(name: str, done: int, total: int) -> None:  # called from the pull's worker thread
        now = time.monotonic()
        if done < total and now - last.get(name, 0.0) < PROGRESS_EVERY_S:
            return
        last[name] = now
        token.run_sync_soon(_offer, send, {"event": "progress", "file": name, "done": done, "total": total})

    async def work() -> None:
        """Runs in the service's nursery: a client that goes away does not cancel the pull (nothing half-done)."""
        async with send:
            try:
                outcome = await service.pull(
                    req.target,
                    trust_publisher=req.trust_publisher,
                    install=req.install,
                    progress=progress,
                    replace_publisher=req.replace_publisher,
                )
                event = {"event": "done"} | outcome.document()
            except ArtifactRefused as exc:
                event = {"event": "error", "reason": exc.detail}
            except Exception as exc:  # never let one pull take the daemon down; the state is left as it was
                log.exception("pull of %s failed", req.target)
                event = {"event": "error", "reason": f"pull failed: {type(exc).__name__}: {exc}"}
            with contextlib.suppress(trio.BrokenResourceError):
                await send.send(event)

    async def lines() -> AsyncIterator[bytes]:
        async with receive:
            async for event in receive:
                yield (json.dumps(event) + "\n").encode()

    service.start_soon(work)
    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _offer(send: trio.MemorySendChannel[dict[str, Any]], event: dict[str, Any]) -> None:
    """Queue a progress event unless the queue is full or closed (progress may be dropped, results are not)."""
    with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
        send.send_nowait(event)
