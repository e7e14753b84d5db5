"""The node's tools over HTTP: GET /v1/tools lists them, POST /v1/tools/{name} runs one (what `mirador tools call`
and `mirador mcp serve` use). Both need the API token: running a tool changes things, and the list shows the user's
files and their errors.

No `from __future__ import annotations` here: FastAPI must see real types on route parameters.
"""

from typing import Any

from fastapi import APIRouter, Request

from node.api.common import ApiError, check_changes, node_of, parse_body
from node.api.tools_schema import ToolCallRequest
from node.tools.registry import ToolReason, ToolRefused
from node.tools.service import ToolService

router = APIRouter()

STATUS = {
    ToolReason.UNKNOWN: 404,
    ToolReason.INVALID_ARGUMENTS: 400,
    ToolReason.FAILED: 422,
    ToolReason.TIMEOUT: 504,
    ToolReason.UNAVAILABLE: 503,
    ToolReason.INVALID_TOOL: 400,
}


def _tools(request: Request) -> ToolService:
    tools = node_of(request).tools
    if tools is None:
        raise ApiError(404, "tools are off on this node ([tools] enabled = false)", code="tools_off")
    return tools


def refusal(exc: ToolRefused) -> ApiError:
    """A tool refusal as the API's error (status by reason, the reason as its code)."""
    return ApiError(STATUS[ToolReason(exc.reason)], exc.detail, code=str(exc.reason))


@router.get("/v1/tools")
async def list_tools(request: Request) -> dict[str, Any]:
    """The node's tools (built-in, the user's, MCP servers') and what failed to load (file paths, errors: the home
    token, like running them)."""
    check_changes(request)
    return _tools(request).status()


@router.post("/v1/tools/{name}")
async def call_tool(name: str, request: Request) -> dict[str, Any]:
    """Run one tool on `arguments`; its result text, or the refusal."""
    check_changes(request)
    tools = _tools(request)
    req = await parse_body(request, ToolCallRequest)
    try:
        content = await tools.registry.call(name, req.arguments)
    except ToolRefused as exc:
        raise refusal(exc) from None
    return {"name": name, "content": content}
