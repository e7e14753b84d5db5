"""The node's own routes: health, status, libp2p peers and connect.

No `from __future__ import annotations` here: FastAPI must see real types on route parameters, or it silently
turns `Request` into a query parameter.
"""

from typing import Any

import multiaddr
from fastapi import APIRouter, Request
from libp2p.peer.peerinfo import info_from_p2p_addr

from node.api.common import ApiError, check_auth, check_changes, node_of, parse_body
from node.api.node_schema import ConnectRequest
from node.p2p.host import P2PError, P2PNode
from node.state import NodeState

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness: answers as soon as the API is up."""
    node = node_of(request)
    return {"status": "stopping" if node.shutting_down else "ok", "model": node.model.id}


@router.get("/v1/node/status")
async def node_status(request: Request) -> dict[str, Any]:
    """Node, profile, model and engine status."""
    check_auth(request)
    return node_of(request).status()


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
    check_changes(request)
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
