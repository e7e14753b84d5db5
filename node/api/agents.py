"""Events and agents over HTTP: POST /v1/events emits one, GET /v1/events streams them (alerts among them) as SSE,
/v1/agents lists, switches, runs the agents and lists their alerts. All of it needs the API token: events and alerts
may carry what the user's agents read.

No `from __future__ import annotations` here: FastAPI must see real types on route parameters.
"""

import json
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import trio
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from node.agents.events import MAX_LISTENERS
from node.agents.service import ALERT_EVENT, AgentService, AgentState
from node.agents.triggers import BUILT_IN_EVENTS
from node.api.common import ApiError, check_changes, node_of, parse_body
from node.api.openai_schema import error_body
from node.api.tools_schema import AgentRunRequest, EventRequest
from node.sdk import Event

router = APIRouter()

# made by the node only: its own events (an agent trusts them as the node's) and the agents' wake-ups
RESERVED = {ALERT_EVENT, "schedule", "threshold", "manual", *BUILT_IN_EVENTS}
MAX_EVENT_DATA = 64 * 1024  # bytes of JSON: an event is kept with every alert it causes
HEARTBEAT_S = 15.0


def _agents(request: Request) -> AgentService:
    agents = node_of(request).agents
    if agents is None:
        raise ApiError(404, "agents are off on this node ([agents] enabled = false)", code="agents_off")
    return agents


def _agent(request: Request, name: str) -> tuple[AgentService, AgentState]:
    agents = _agents(request)
    try:
        return agents, agents.get(name)
    except KeyError:
        known = ", ".join(agents.agents) or "none"
        raise ApiError(404, f"no agent named {name!r} (agents: {known})", code="unknown_agent") from None


def _event_dict(event: Event) -> dict[str, Any]:
    return {"name": event.name, "data": event.data, "at": event.at, "source": event.source}


@router.post("/v1/events")
async def emit_event(request: Request) -> dict[str, Any]:
    """Emit an event: agents with `event:<name>` wake, thresholds on `<name>` compare its `value`."""
    check_changes(request)
    req = await parse_body(request, EventRequest)
    if req.name in RESERVED:
        raise ApiError(400, f"{req.name!r} events are made by the node itself", param="name", code="reserved_event")
    data = dict(req.data)
    if len(json.dumps(data, default=str)) > MAX_EVENT_DATA:
        raise ApiError(413, f"an event's data is limited to {MAX_EVENT_DATA} bytes of JSON", param="data")
    if req.value is not None:
        if not math.isfinite(req.value):
            raise ApiError(400, "value must be a finite number", param="value")
        data["value"] = req.value
    event = node_of(request).events.emit(req.name, data, source="api")
    return {"object": "event", **_event_dict(event)}


@router.get("/v1/events")
async def stream_events(request: Request, names: str = "") -> StreamingResponse:
    """Every event from now on as SSE (`event: <name>`, JSON data), filtered by `names` (comma-separated)."""
    check_changes(request)
    bus = node_of(request).events
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    if bus.listeners() >= MAX_LISTENERS:
        raise ApiError(
            503,
            f"{MAX_LISTENERS} event streams are open already",
            code="too_many_streams",
            headers={"Retry-After": "5"},
        )

    async def body() -> AsyncIterator[str]:
        try:  # registered here, not in the route: a response that never starts never runs this generator
            listener = bus.listen()
        except RuntimeError as exc:
            yield f"data: {json.dumps(error_body(str(exc), 'server_error', code='too_many_streams'))}\n\n"
            return
        reported = 0
        try:
            yield ": mirador events\n\n"
            while True:
                event: Event | None = None
                with trio.move_on_after(HEARTBEAT_S):  # only the wait inside the scope: a yield must not be
                    event = await listener.receive.receive()
                if event is None:
                    yield ": keep-alive\n\n"
                    continue
                if listener.dropped > reported:
                    yield f": dropped {listener.dropped - reported} events (too slow)\n\n"
                    reported = listener.dropped
                if not wanted or event.name in wanted:
                    data = json.dumps(_event_dict(event), ensure_ascii=False, default=str)
                    yield f"event: {event.name}\ndata: {data}\n\n"
        finally:
            bus.unlisten(listener)

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.get("/v1/agents")
async def list_agents(request: Request) -> dict[str, Any]:
    """The agents, their triggers and how their runs went, and what failed to load."""
    check_changes(request)
    return _agents(request).status()


@router.post("/v1/agents/{name}/run")
async def run_agent(name: str, request: Request) -> dict[str, Any]:
    """Run an agent once now (a `manual` event); its alert or its error."""
    check_changes(request)
    agents, _ = _agent(request, name)
    raw = await request.body()
    data = parse_body_or_empty(raw)
    return await agents.run_now(name, data)


def parse_body_or_empty(raw: bytes) -> dict[str, Any]:
    """The `data` of an optional AgentRunRequest body."""
    if not raw.strip():
        return {}
    try:
        return AgentRunRequest.model_validate_json(raw).data
    except ValueError as exc:
        raise ApiError(400, f'the body must be {{"data": {{...}}}}: {exc}') from None


# after /run: Starlette answers with the first route whose path matches
@router.post("/v1/agents/{name}/{switch}")
async def switch_agent(name: str, switch: Literal["enable", "disable"], request: Request) -> dict[str, Any]:
    """Turn an agent on (clearing its back-off) or off (its triggers skipped until it is enabled again)."""
    check_changes(request)
    agents, _ = _agent(request, name)
    state = await trio.to_thread.run_sync(agents.set_enabled, name, switch == "enable")
    return state.summary()


@router.get("/v1/agents/alerts")
async def list_alerts(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    agent: Annotated[str | None, Query(max_length=200)] = None,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> dict[str, Any]:
    """The newest alerts first (of one agent, newer than the alert id `after`, when given)."""
    check_changes(request)
    agents = _agents(request)
    rows = await trio.to_thread.run_sync(agents.alerts.recent, limit, agent, after)
    return {"object": "list", "data": [r.as_dict() for r in rows]}
