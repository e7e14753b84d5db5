"""The node as an MCP client: every `[[tools.mcp]]` server (a command spoken to over stdio, or a streamable HTTP URL) is
connected in the background and its tools are offered to the registry as `<server>__<tool>` (origin `mcp:<server>`).
A server that cannot start or dies is recorded in the tools' errors, logged and reconnected with back-off (1 s doubling
to 60 s). Every server is hostile input: the sizes taken from it are bounded.

The SDK's clients are anyio code; anyio runs on trio, so they run in the daemon's trio loop directly (no thread).
"""

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from mcp import ClientSession, StdioServerParameters, stdio_client, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from node import __version__
from node.core.config import McpServer
from node.tools.registry import MAX_RESULT_CHARS, Runner, Tool, ToolReason, ToolRefused, check_definition

log = logging.getLogger(__name__)

MAX_TOOLS = 256  # per server; the rest are left out (and said so)
MAX_NOTES = 64  # refusals recorded per server (a server could invent new ones forever)
MAX_PAGES = 16  # tools/list pages read per connection
MAX_DESCRIPTION = 2_000  # characters of a tool's description
MAX_SCHEMA_BYTES = 64 * 1024  # a tool's input schema as JSON
MAX_DETAIL = 2_000  # characters of an error message taken from a server
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0  # also: a session that lasted this long starts the back-off again at BACKOFF_START_S
PING_EVERY_S = 30.0  # a connected server is pinged this often; no answer within its timeout_s -> reconnected
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def exposed_name(server: str, tool: str) -> str:
    """The registry's name of a server's tool: `<server>__<tool>`, other characters as '_', at most 64 characters
    (a longer one is cut and ends with 8 hex digits of the tool's name, so cut names stay distinct)."""
    name = _UNSAFE.sub("_", f"{server}__{tool}")
    if len(name) > 64:
        name = name[:55] + "_" + hashlib.sha256(tool.encode()).hexdigest()[:8]
    return name


def _cut(text: str, limit: int = MAX_DETAIL) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def content_text(result: types.CallToolResult) -> str:
    """A tool result as text: its text parts joined; its structured content as JSON when it has no text; placeholders
    for what is neither (images, audio, binary resources). Reading stops once the text is past what the registry
    keeps."""
    texts: list[str] = []
    others: list[str] = []
    size = 0
    for block in result.content:
        if isinstance(block, types.TextContent):
            text = block.text
        elif isinstance(block, types.EmbeddedResource) and isinstance(block.resource, types.TextResourceContents):
            text = block.resource.text
        else:
            others.append(f"[{block.type} content left out]")
            continue
        texts.append(text)
        size += len(text)
        if size > MAX_RESULT_CHARS:
            break
    if texts:
        return "\n".join(texts)
    if result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False, default=str)
    return "\n".join(others[:16])


def _why(exc: BaseException) -> str:
    """One line for an exception (the first leaf of an exception group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, trio.TooSlowError):
        return "no answer in time"
    text = exc.message if isinstance(exc, MCPError) else f"{type(exc).__name__}: {exc}" if str(exc) else ""
    return _cut(" ".join(text.split()) or type(exc).__name__)


def config_problem(server: McpServer) -> str | None:
    """Why a `[[tools.mcp]]` entry cannot be connected at all (then it is not retried), or None."""
    if bool(server.command) == bool(server.url):
        return "give either `command` (a server spoken to over stdio) or `url` (streamable HTTP), not both or neither"
    if server.url and not server.url.startswith(("http://", "https://")):
        return f"url {server.url!r}: only http:// and https:// endpoints are supported"
    return None


class _Watched:
    """A transport's read stream that says when it ends (the server closed it, exited or was killed), so a dead
    session is noticed at once rather than at the next call or ping."""

    def __init__(self, stream: Any, on_end: Callable[[], None]) -> None:
        self._stream = stream
        self._on_end = on_end

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def __aenter__(self) -> "_Watched":
        await self._stream.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        self._on_end()
        return await self._stream.__aexit__(*exc)

    def __aiter__(self) -> "_Watched":
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            self._on_end()
            raise


@dataclass
class _Link:
    """One configured server: its session while connected, the tools it offers now, what went wrong last."""

    server: McpServer
    session: ClientSession | None = None
    remote: dict[str, str] | None = None  # exposed name -> the server's own name (the listing; None: not connected)
    offered: set[str] = field(default_factory=set)  # exposed names handed to the registry (once each)
    noted: set[str] = field(default_factory=set)  # refusals already recorded in errors
    failure: tuple[str, str] | None = None  # this server's connection error, while it is in `errors`
    lost: trio.Event = field(default_factory=trio.Event)
    lost_why: str = ""

    @property
    def where(self) -> str:
        """The origin of its tools and the label of its errors."""
        return f"mcp:{self.server.name}"


class McpClients:
    """The configured MCP servers, each kept connected by its own task; their tools go to `offer`."""

    def __init__(
        self, servers: list[McpServer], offer: Callable[[str, Tool], None], errors: list[tuple[str, str]]
    ) -> None:
        self._offer = offer
        self.errors = errors
        self.links: dict[str, _Link] = {}
        for server in servers:
            if server.name in self.links:
                self._note(_Link(server), f"a second [[tools.mcp]] entry named {server.name!r} is ignored")
                continue
            self.links[server.name] = _Link(server)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every server connected until cancelled; started at once (no server delays the daemon)."""
        async with trio.open_nursery() as nursery:
            for link in self.links.values():
                nursery.start_soon(self._keep, link, name=f"mcp:{link.server.name}")
            task_status.started()

    def connected(self) -> list[str]:
        """The names of the servers connected now."""
        return [name for name, link in self.links.items() if link.session is not None]

    # -- one server --------------------------------------------------------------------------------------------------

    async def _keep(self, link: _Link) -> None:
        if (problem := config_problem(link.server)) is not None:
            self._fail(link, problem)
            return
        delay = BACKOFF_START_S
        while True:
            began = trio.current_time()
            link.lost_why = ""
            try:
                why = await self._serve(link)
            except Exception as exc:  # whatever a hostile or broken server causes ends this session alone
                why = self._connect_failure(link, exc) if link.remote is None else link.lost_why or _why(exc)
            if trio.current_time() - began >= BACKOFF_MAX_S:
                delay = BACKOFF_START_S  # it worked for a while: this is a new failure, not the same one again
            self._fail(link, f"{why} (next try in {delay:g} s)")
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    @staticmethod
    def _connect_failure(link: _Link, exc: Exception) -> str:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, MCPError) and leaf.code == types.CONNECTION_CLOSED and link.server.command:
            return (
                "could not connect: it exited or closed its output before answering (its stderr is in the node's log)"
            )
        return f"could not connect: {_why(exc)}"

    @asynccontextmanager
    async def _connect(self, link: _Link) -> AsyncIterator[ClientSession]:
        server = link.server
        info = types.Implementation(name="mirador", version=__version__)
        if server.url:
            transport = streamable_http_client(server.url)
        else:
            env = server.env or None  # merged over the SDK's short list (HOME, PATH, ...): the node's secrets stay
            params = StdioServerParameters(command=server.command[0], args=server.command[1:], env=env)
            transport = stdio_client(params)  # its stderr goes to the daemon's log
        async with (
            transport as (read, write),
            ClientSession(
                _Watched(read, lambda: self._lose(link, "the connection closed")),
                write,
                read_timeout_seconds=server.timeout_s,
                client_info=info,
            ) as session,
        ):
            with trio.fail_after(server.timeout_s):
                await session.initialize()
            yield session

    async def _serve(self, link: _Link) -> str:
        """Connect, offer the tools, and wait until the session is lost; why it was."""
        link.remote = None
        link.lost = trio.Event()
        async with self._connect(link) as session:
            listed = await self._list(session, link.server)
            link.remote = self._take(link, listed)
            link.session = session
            self._clear_failure(link)
            log.info("tools: mcp server %s connected (%d tools)", link.server.name, len(link.remote))
            try:
                async with trio.open_nursery() as watch:
                    watch.start_soon(self._ping, link, session)
                    await link.lost.wait()
                    watch.cancel_scope.cancel()
            finally:
                link.session = None
        return link.lost_why

    async def _list(self, session: ClientSession, server: McpServer) -> list[types.Tool]:
        tools: list[types.Tool] = []
        cursor: str | None = None
        with trio.fail_after(server.timeout_s):
            for _ in range(MAX_PAGES):
                params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
                page = await session.list_tools(params=params)
                tools += page.tools
                cursor = page.next_cursor
                if not cursor or len(tools) > MAX_TOOLS:
                    break
        return tools[: MAX_TOOLS + 1]  # one more says there were too many

    async def _ping(self, link: _Link, session: ClientSession) -> None:
        while True:
            await trio.sleep(PING_EVERY_S)
            try:
                with trio.fail_after(link.server.timeout_s):
                    await session.send_ping()
            except Exception as exc:
                self._lose(link, f"it stopped answering: {_why(exc)}")
                return

    def _lose(self, link: _Link, why: str) -> None:
        if not link.lost.is_set():
            link.lost_why = why
            link.lost.set()

    def _take(self, link: _Link, listed: list[types.Tool]) -> dict[str, str]:
        """Check the listed tools; offer the new ones; the exposed -> remote names of those that can be called."""
        remote: dict[str, str] = {}
        if len(listed) > MAX_TOOLS:
            self._note(link, f"it offers more than {MAX_TOOLS} tools; the first {MAX_TOOLS} are used")
        for tool in listed[:MAX_TOOLS]:
            exposed = exposed_name(link.server.name, tool.name)
            try:
                if not tool.name:
                    raise ToolRefused(ToolReason.INVALID_TOOL, "a tool without a name")
                if exposed in remote:
                    detail = f"tool {tool.name!r} is named {exposed} here, like {remote[exposed]!r}"
                    raise ToolRefused(ToolReason.INVALID_TOOL, detail)
                size = len(json.dumps(tool.input_schema))
                if size > MAX_SCHEMA_BYTES:
                    detail = f"tool {exposed}: its input schema has {size} bytes (at most {MAX_SCHEMA_BYTES})"
                    raise ToolRefused(ToolReason.INVALID_TOOL, detail)
                check_definition(exposed, tool.input_schema)
            except ToolRefused as exc:
                self._note(link, exc.detail)
                continue
            remote[exposed] = tool.name
            if exposed not in link.offered and len(link.offered) >= MAX_TOOLS:  # renamed on every reconnect: bounded
                self._note(link, f"it has offered {MAX_TOOLS} different tools since the node started; no more")
                continue
            if exposed not in link.offered:
                link.offered.add(exposed)
                description = _cut(tool.description or tool.title or "", MAX_DESCRIPTION)
                parameters = dict(tool.input_schema)
                self._offer(link.where, Tool(exposed, description, parameters, link.where, self._runner(link, exposed)))
        return remote

    def _runner(self, link: _Link, exposed: str) -> Runner:
        async def run(arguments: dict[str, Any]) -> str:
            return await self._call(link, exposed, arguments)

        return run

    async def _call(self, link: _Link, exposed: str, arguments: dict[str, Any]) -> str:
        """Call a tool over its server's session: its text, or ToolRefused."""
        server = link.server
        session = link.session
        if session is None:
            why = link.failure[1] if link.failure else "it is still starting"
            raise ToolRefused(ToolReason.UNAVAILABLE, f"{exposed}: MCP server {server.name} is not connected: {why}")
        if (remote := (link.remote or {}).get(exposed)) is None:
            raise ToolRefused(ToolReason.UNAVAILABLE, f"{exposed}: MCP server {server.name} no longer offers it")
        try:
            result = await session.call_tool(remote, arguments, read_timeout_seconds=server.timeout_s)
        except MCPError as exc:
            if exc.code == types.CONNECTION_CLOSED:
                self._lose(link, "the connection closed")
                detail = f"{exposed}: MCP server {server.name} went away (it is restarted in the background)"
                raise ToolRefused(ToolReason.UNAVAILABLE, detail) from None
            if exc.code == types.REQUEST_TIMEOUT:
                detail = f"{exposed}: MCP server {server.name} did not answer within {server.timeout_s:g} s"
                raise ToolRefused(ToolReason.TIMEOUT, detail) from None
            raise ToolRefused(ToolReason.FAILED, f"{exposed}: {_cut(exc.message)}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._lose(link, _why(exc))
            raise ToolRefused(ToolReason.UNAVAILABLE, f"{exposed}: MCP server {server.name} went away") from None
        except (RuntimeError, ValueError) as exc:  # a result the SDK refuses (shape, output schema)
            raise ToolRefused(ToolReason.FAILED, f"{exposed}: {_why(exc)}") from None
        text = content_text(result)
        if result.is_error:
            raise ToolRefused(ToolReason.FAILED, f"{exposed}: {_cut(text) or 'the tool reported an error'}")
        return text

    # -- errors ------------------------------------------------------------------------------------------------------

    def _note(self, link: _Link, detail: str) -> None:
        """Record a refused tool or entry once."""
        if detail not in link.noted and len(link.noted) < MAX_NOTES:
            link.noted.add(detail)
            self.errors.append((link.where, detail))
            log.error("tools: mcp server %s: %s", link.server.name, detail)

    def _fail(self, link: _Link, why: str) -> None:
        """Replace this server's connection error in `errors`."""
        self._clear_failure(link)
        link.failure = (link.where, why)
        self.errors.append(link.failure)
        log.warning("tools: mcp server %s: %s", link.server.name, why)

    def _clear_failure(self, link: _Link) -> None:
        if link.failure is not None:
            self.errors[:] = [e for e in self.errors if e is not link.failure]
            link.failure = None
