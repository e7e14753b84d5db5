"""`mirador mcp serve`: the running daemon's tools as an MCP server (the SDK's lowlevel Server), over stdio or
streamable HTTP. Its tool list is GET /v1/tools at every list request (built-ins, the user's tools, MCP servers' tools);
each call is POST /v1/tools/{name} with the home's API token. A refused call is an error result (isError, the
daemon's message), never the end of the server. The daemon's `search_docs` (memory) is also a resource template.

The HTTP transport answers only Host headers naming this machine (the SDK's DNS-rebinding protection) and, like the
daemon's own tool routes, only requests bearing the home's API token.
"""

import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from mcp import types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError

from node import __version__
from node.cli.client import DaemonClient, DaemonError, DaemonRequestError
from node.core.config import is_loopback
from node.core.home import NodeHome
from node.tools.registry import NAME

log = logging.getLogger(__name__)

SEARCH_TEMPLATE = "mirador://memory/search{?query,k,namespace}"
CALL_TIMEOUT_S = 3600.0  # the daemon bounds every tool by its own timeout; this only catches a hung daemon
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")

Asgi = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class NodeTools:
    """The running daemon's tool routes; the daemon (its port, its token) is looked up again for every request, so a
    restarted daemon is found."""

    def __init__(self, home: NodeHome) -> None:
        self.home = home

    def _request(self, path: str, body: dict[str, Any] | None) -> Any:
        client = DaemonClient(self.home, timeout_s=CALL_TIMEOUT_S)
        try:
            return client.get(path) if body is None else client.post(path, body)
        finally:
            client.http.close()

    async def tools(self) -> list[dict[str, Any]]:
        """GET /v1/tools: the daemon's tools."""
        doc = await trio.to_thread.run_sync(self._request, "/v1/tools", None, abandon_on_cancel=True)  # type: ignore[call-arg]  # mypy misreads trio 0.35 stubs
        return list(doc["tools"])

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        """POST /v1/tools/{name}: the result text; DaemonError (one line) when refused."""
        if not NAME.fullmatch(name):  # never a path of its own: `../memory/forget` stays a tool name
            raise DaemonRequestError(f"no tool named {name!r} on this node")
        body = {"arguments": arguments}
        path = f"/v1/tools/{name}"
        doc = await trio.to_thread.run_sync(self._request, path, body, abandon_on_cancel=True)  # type: ignore[call-arg]  # mypy misreads trio 0.35 stubs
        return str(doc["content"])


def _text(text: str, error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=error)


def search_arguments(uri: str) -> dict[str, Any]:
    """The search_docs arguments of a `mirador://memory/search?query=...&k=...&namespace=...` URI."""
    parts = urlsplit(uri)
    if (parts.scheme, parts.netloc, parts.path) != ("mirador", "memory", "/search"):
        raise MCPError(types.INVALID_PARAMS, f"unknown resource {uri!r} (this server has {SEARCH_TEMPLATE})")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if not query.get("query"):
        raise MCPError(types.INVALID_PARAMS, f"{uri!r}: give ?query=")
    arguments: dict[str, Any] = {"query": query["query"]}
    if "k" in query:
        try:
            arguments["k"] = int(query["k"])
        except ValueError:
            raise MCPError(types.INVALID_PARAMS, f"{uri!r}: k must be a whole number") from None
    if "namespace" in query:
        arguments["namespace"] = query["namespace"]
    return arguments


def build_server(home: NodeHome) -> Server[Any]:
    """The MCP server over the daemon of `home`."""
    node = NodeTools(home)

    async def list_tools(ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None) -> Any:
        try:
            tools = await node.tools()
        except DaemonError as exc:
            raise MCPError(types.INTERNAL_ERROR, str(exc)) from None
        listed = [types.Tool(name=t["name"], description=t["description"], input_schema=t["parameters"]) for t in tools]
        return types.ListToolsResult(tools=listed)

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> Any:
        try:
            return _text(await node.call(params.name, dict(params.arguments or {})))
        except DaemonError as exc:  # refused by the daemon, or no daemon: the client's model reads why
            return _text(str(exc), error=True)
        except Exception as exc:  # e.g. an answer that is not JSON: this call fails, the server goes on
            log.warning("mcp: tool %s", params.name, exc_info=True)
            return _text(f"{type(exc).__name__}: {exc}", error=True)

    async def list_resources(ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None) -> Any:
        return types.ListResourcesResult(resources=[])

    async def list_templates(ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None) -> Any:
        try:
            names = {t["name"] for t in await node.tools()}
        except DaemonError as exc:
            raise MCPError(types.INTERNAL_ERROR, str(exc)) from None
        template = types.ResourceTemplate(
            uri_template=SEARCH_TEMPLATE,
            name="memory-search",
            description="The node's memory: the passages closest to `query` (search_docs), as JSON",
            mime_type="application/json",
        )
        return types.ListResourceTemplatesResult(resource_templates=[template] if "search_docs" in names else [])

    async def read_resource(ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams) -> Any:
        arguments = search_arguments(str(params.uri))
        try:
            text = await node.call("search_docs", arguments)
        except DaemonError as exc:
            raise MCPError(types.INTERNAL_ERROR, str(exc)) from None
        contents = types.TextResourceContents(uri=params.uri, mime_type="application/json", text=text)
        return types.ReadResourceResult(contents=[contents])

    return Server(
        "mirador",
        version=__version__,
        instructions="Tools of the local Mirador node: sandboxed Python, exact maths, its memory, the user's tools.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_list_resource_templates=list_templates,
        on_read_resource=read_resource,
    )


async def serve_stdio(home: NodeHome) -> None:
    """Serve MCP on this process's stdin/stdout until stdin closes."""
    server = build_server(home)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def _wildcard(host: str) -> bool:
    """Whether `host` is an "any address" bind (not a name a client would send as Host)."""
    try:
        return not host or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def allowed_hosts(host: str, port: int, extra: list[str]) -> list[str]:
    """The Host headers the HTTP transport answers: this machine's loopback names, the bound host (unless it is a
    wildcard) and `extra`, each with the port."""
    bound = f"[{host}]" if ":" in host else host
    names = [*LOCAL_HOSTS, *([] if _wildcard(host) else [bound]), *extra]
    return list(dict.fromkeys(f"{n}:{port}" for n in names))


def require_token(app: Asgi, token: str) -> Asgi:
    """`app` answering only HTTP requests whose Authorization is `Bearer <token>` (401 otherwise)."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                body = json.dumps({"error": "send the node's API token: Authorization: Bearer <HOME/api.token>"})
                headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body.encode()})
                return
        await app(scope, receive, send)

    return guarded


async def serve_http(
    home: NodeHome,
    host: str,
    port: int,
    extra_hosts: list[str] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve MCP over streamable HTTP at http://HOST:PORT/mcp until cancelled."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    client = DaemonClient(home)  # the token the CLI sends the daemon is the one this server asks for
    token = client.http.headers.get("authorization", "").removeprefix("Bearer ")
    client.http.close()
    if not token and not is_loopback(host):  # the node's own rule for its API: no open tools on the network
        raise DaemonError(f"serving on {host} needs an API token ([api] token, or the home token): none is set")
    hosts = allowed_hosts(host, port, extra_hosts or [])
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=hosts,
        allowed_origins=[f"http://{h}" for h in hosts] + [f"https://{h}" for h in hosts],
    )
    app: Any = build_server(home).streamable_http_app(transport_security=security, host=host)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("mirador.mcp.http")
    config.graceful_timeout = 2.0
    served: Any = require_token(app, token) if token else app
    await serve(served, config, task_status=task_status)
