"""HTTP routes of federations: create, join, leave, list with status, rounds."""

import base64
from typing import Any, Literal

import trio
from fastapi import APIRouter, Request
from pydantic import Field

from federation.descriptor import FederationRefused
from node.api.common import ApiError, check_auth, check_changes, data_file, node_of, parse_body
from node.api.node_schema import _Closed
from node.fed.errors import FederationError
from node.fed.node import FederationNode
from node.fed.wire import WireError
from node.p2p.host import P2PError

router = APIRouter()
NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class CreateRequest(_Closed):
    """`POST /v1/federations`: a new federation with this node as creator and first member."""

    name: str = Field(pattern=NAME)
    mode: Literal["dp", "he", "he+dp", "dp-user", "he+dp-user"] = "dp"
    data: str = Field(min_length=1, max_length=4096)
    rank: int = Field(default=4, ge=1, le=256)
    alpha: float = Field(default=8.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=7)
    lora: Literal["ffa", "ab"] = "ab"  # ffa: lora_A frozen at its seeded init, only lora_B trained and aggregated
    update_encoding: Literal["f32", "q8"] = "f32"  # q8: plain updates as 8-bit codes (federation.quantize)
    clip_norm: float = Field(default=1.0, gt=0)
    noise_multiplier: float | None = Field(default=None, ge=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    strategy: str = Field(default="fedavg", max_length=32)
    strategy_params: dict[str, int | float] = Field(default_factory=dict, max_length=32)
    quorum: int = Field(default=2, ge=2)
    min_members: int = Field(default=2, ge=2)
    expected_members: int | None = Field(default=None, ge=2, le=10_000_000)  # dp-user: contributors per round
    round_deadline_s: int = Field(default=300, ge=1, le=86400)
    local_steps: int = Field(default=20, ge=1, le=10000)
    epsilon_budget: float = Field(default=8.0, gt=0)
    admission: Literal["open", "invite"] = "open"
    train_options: dict[str, int | float] = Field(default_factory=dict, max_length=16)
    personal: bool = True  # train and serve a personal adapter beside the global one


class JoinRequestBody(_Closed):
    """`POST /v1/federations/join`: join NAME created by CREATOR (fingerprint), found in the DHT."""

    name: str = Field(pattern=NAME)
    creator: str = Field(min_length=10, max_length=64)
    data: str | None = Field(default=None, min_length=1, max_length=4096)
    role: Literal["member", "aggregator"] = "member"
    invite: str | None = Field(default=None, max_length=8192)
    train_options: dict[str, int | float] = Field(default_factory=dict, max_length=16)
    personal: bool = True  # train and serve a personal adapter beside the global one


def _federations(request: Request) -> FederationNode:
    fed: FederationNode | None = node_of(request).federations
    if fed is None:
        raise ApiError(409, "federations need the P2P host and the embedded store", code="federations_unavailable")
    return fed


def _refused(exc: Exception) -> ApiError:
    if isinstance(exc, trio.TooSlowError):
        return ApiError(504, "the federation did not answer in time", code="federation_timeout")
    return ApiError(400, str(exc), code="federation_refused")


@router.post("/v1/federations")
async def create(request: Request) -> dict[str, Any]:
    """Create a federation (signed descriptor into the DHT); this node is its creator and first member."""
    check_changes(request)
    fed = _federations(request)
    req = await parse_body(request, CreateRequest)
    spec = req.model_dump()
    spec["data"] = str(data_file(request, req.data))
    if spec["noise_multiplier"] is None:
        spec.pop("noise_multiplier")
    try:
        return await fed.create(spec)
    except (FederationRefused, FederationError, ValueError) as exc:
        raise _refused(exc) from None


@router.post("/v1/federations/join")
async def join(request: Request) -> dict[str, Any]:
    """Join a federation found in the DHT, through its creator."""
    check_changes(request)
    fed = _federations(request)
    req = await parse_body(request, JoinRequestBody)
    if req.role == "member" and not req.data:
        raise ApiError(400, "a member trains on local data: give 'data'", param="data")
    data = str(data_file(request, req.data)) if req.data else None
    try:
        invite = base64.b64decode(req.invite, validate=True) if req.invite else None
    except ValueError:
        raise ApiError(400, "'invite' is not base64 (give the token as issued)", param="invite") from None
    try:
        with trio.fail_after(60):
            return await fed.join(req.name, req.creator, data, req.role, invite, req.train_options, req.personal)
    except (FederationRefused, FederationError, WireError, P2PError, ValueError, trio.TooSlowError) as exc:
        raise _refused(exc) from None


@router.get("/v1/federations")
async def federations(request: Request) -> dict[str, Any]:
    """Every federation this node is in, with its status and privacy spent."""
    check_auth(request)
    fed = _federations(request)
    rows = await trio.to_thread.run_sync(lambda: [fed.summary(r.id) for r in fed.state.federations(False)])
    return {
        "federations": rows,
        "epsilon_total": await trio.to_thread.run_sync(fed.privacy_total),
        "datasets": await trio.to_thread.run_sync(fed.privacy_by_dataset),
    }


@router.get("/v1/federations/{fid}/rounds")
async def rounds(request: Request, fid: str) -> dict[str, Any]:
    """A federation's rounds (newest first) and the updates it refused."""
    check_auth(request)
    fed = _federations(request)
    if fed.state.federation(fid) is None:
        raise ApiError(404, f"unknown federation {fid}", code="unknown_federation")
    rejected = [
        {"round": r.round, "member": r.member, "reason": r.reason, "detail": r.detail}
        for r in fed.state.rejections(fid)
    ]
    return {"rounds": fed.rounds(fid), "rejected": rejected}


@router.post("/v1/federations/{fid}/leave")
async def leave(request: Request, fid: str) -> dict[str, Any]:
    """Stop taking part in a federation."""
    check_changes(request)
    fed = _federations(request)
    if not fed.leave(fid):
        raise ApiError(404, f"not an active federation: {fid}", code="unknown_federation")
    return {"federation_id": fid, "left": True}
