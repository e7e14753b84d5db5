"""MCP both ways, with real parts: the `mcp` SDK's own client talks to `mirador mcp serve` (stdio and streamable HTTP)
in front of a real daemon; the daemon connects a real MCP server process configured in node.toml, loses it to SIGKILL
and gets it back; `mirador tools list|call`; and McpClients against a hostile server, in process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import trio
from mcp import ClientSession, StdioServerParameters, stdio_client, types
from mcp.client.streamable_http import streamable_http_client

from node.core.config import McpServer
from node.tools.mcp_client import MAX_DESCRIPTION, MAX_TOOLS, McpClients
from node.tools.registry import Tool, ToolReason, ToolRefused, ToolRegistry
from tests.daemon_harness import Daemon, free_port, node_env, run_cli, running

MIRADOR = str(Path(sys.executable).with_name("mirador"))
INTEGRAL = "integrate(x**2, (x, 0, 3))"

DEMO = """
from mcp.server.mcpserver import MCPServer

server = MCPServer("demo")


@server.tool()
def shout(text: str) -> str:
    \"\"\"Shout the text.\"\"\"
    return text.upper() + "!"


server.run()
"""

HOSTILE = """
# Raw JSON-RPC on stdio, no SDK: what a hostile server sends is not bound by the SDK's own checks.
import json
import sys
import time

SCHEMA = {"type": "object", "properties": {"x": {"type": "string"}}}
TOOLS = [{"name": f"t{i}", "description": "many", "inputSchema": SCHEMA} for i in range(300)]
TOOLS[0] = {"name": "wordy", "description": "w" * 50_000, "inputSchema": SCHEMA}
TOOLS[1] = {"name": "bad schema", "inputSchema": {"type": "object", "properties": {"x": {"type": "no-such-type"}}}}
TOOLS[2] = {"name": "fails", "inputSchema": SCHEMA}
TOOLS[3] = {"name": "slow", "inputSchema": SCHEMA}
TOOLS[4] = {"name": "structured", "inputSchema": SCHEMA}
TOOLS[5] = {"name": "huge", "inputSchema": SCHEMA | {"description": "h" * 100_000}}
TOOLS[6] = {"name": "dotted.name", "inputSchema": SCHEMA}


def text(t, error=False):
    return {"content": [{"type": "text", "text": t}], "isError": error}


for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    method, params = message["method"], message.get("params") or {}
    if method == "initialize":
        info = {"name": "hostile", "version": "0"}
        result = {"protocolVersion": params["protocolVersion"], "capabilities": {"tools": {}}, "serverInfo": info}
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call" and params["name"] == "fails":
        result = text("it broke", error=True)
    elif method == "tools/call" and params["name"] == "slow":
        time.sleep(30)  # and no answer to anything meanwhile
        result = text("late")
    elif method == "tools/call" and params["name"] == "structured":
        result = {"content": [], "structuredContent": {"answer": 42}}
    elif method == "tools/call":
        result = text("x" * 100_000)
    else:
        result = {}
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
"""


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until it returns something true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def listed(node: Daemon) -> dict[str, Any]:
    r = httpx.get(f"{node.url}/v1/tools", headers=node.auth, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def call(node: Daemon, name: str, arguments: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{node.url}/v1/tools/{name}", json={"arguments": arguments}, headers=node.auth, timeout=60)


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live child of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == pid:
            found.append((int(entry.name), cmdline))
    return found


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module, with the demo MCP server configured in its node.toml."""
    folder = tmp_path_factory.mktemp("mcp")
    script = folder / "demo_mcp.py"
    script.write_text(DEMO)
    home = folder / "home"
    home.mkdir()
    (home / "node.toml").write_text(
        f'[[tools.mcp]]\nname = "demo"\ncommand = [{json.dumps(sys.executable)}, "{script}"]\n'
    )
    daemons = running(home)
    d = next(daemons)
    try:
        wait_for(lambda: any(t["name"] == "demo__shout" for t in listed(d)["tools"]), 30, "demo__shout listed")
        yield d
    finally:
        daemons.close()


def in_trio(body: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    """Run an async test body under trio (the daemon's loop, which the SDK's anyio code runs on), bounded."""

    async def bounded() -> Any:
        with trio.fail_after(timeout):
            return await body()

    return trio.run(bounded)


def text_of(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def exercise(session: ClientSession) -> None:
    """What both transports must do: list, call, refuse, and keep serving."""
    await session.initialize()
    names = {t.name for t in (await session.list_tools()).tools}
    assert {"calculate", "run_python", "demo__shout"} <= names
    result = await session.call_tool("calculate", {"expression": INTEGRAL})
    assert not result.is_error and '"9"' in text_of(result)
    unknown = await session.call_tool("no_such_tool", {})
    assert unknown.is_error and "no tool named 'no_such_tool'" in text_of(unknown)
    bad = await session.call_tool("calculate", {"expr": 1})
    assert bad.is_error and "HTTP 400" in text_of(bad) and "expression" in text_of(bad)
    sneaky = await session.call_tool("../memory/forget", {"everything": True})
    assert sneaky.is_error and "no tool named" in text_of(sneaky)
    again = await session.call_tool("demo__shout", {"text": "still here"})
    assert not again.is_error and text_of(again) == "STILL HERE!"


def test_the_sdk_client_over_stdio_lists_and_calls_the_nodes_tools(node: Daemon) -> None:
    # Arrange: the SDK's stdio client spawns `mirador mcp serve` as Claude Desktop would
    params = StdioServerParameters(command=MIRADOR, args=["--home", str(node.home), "mcp", "serve"])
    searched: list[types.ReadResourceResult] = []

    async def body() -> None:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            # Act / Assert (inside: the session is live)
            await exercise(session)
            templates = (await session.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == ["mirador://memory/search{?query,k,namespace}"]
            searched.append(await session.read_resource("mirador://memory/search?query=bees&k=2"))

    in_trio(body)
    # Assert: the memory is empty, and says so as JSON
    contents = searched[0].contents[0]
    assert isinstance(contents, types.TextResourceContents) and json.loads(contents.text) == []


@pytest.fixture(scope="module")
def http_server(node: Daemon) -> Iterator[str]:
    """`mirador mcp serve --http` on a free port; its /mcp URL."""
    port = free_port()
    proc = subprocess.Popen(
        [MIRADOR, "--home", str(node.home), "mcp", "serve", "--http", "--port", str(port)],
        env=node_env(node.home, node.port),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/mcp"

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            return httpx.get(url, timeout=1).status_code == 401
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 30, "mcp serve --http answering")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_sdk_client_over_streamable_http(node: Daemon, http_server: str) -> None:
    # Arrange
    async def body() -> None:
        async with (
            httpx2.AsyncClient(headers=node.auth) as http,
            streamable_http_client(http_server, http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            # Act / Assert
            await exercise(session)

    in_trio(body)


def test_the_http_transport_refuses_foreign_hosts_and_missing_tokens(node: Daemon, http_server: str) -> None:
    # Arrange: a DNS-rebinding page would reach 127.0.0.1 with its own name in Host
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    accept = {"Accept": "application/json, text/event-stream"}
    # Act
    rebound = httpx.post(http_server, json=ping, headers=node.auth | accept | {"Host": "evil.example:80"}, timeout=10)
    no_token = httpx.post(http_server, json=ping, headers=accept, timeout=10)
    wrong_token = httpx.post(http_server, json=ping, headers=accept | {"Authorization": "Bearer guess"}, timeout=10)
    # Assert
    assert rebound.status_code == 421 and "Host" in rebound.text
    assert no_token.status_code == 401 and wrong_token.status_code == 401


def test_a_configured_mcp_servers_tool_is_called_by_the_node_and_comes_back_after_a_kill(node: Daemon) -> None:
    # Arrange
    tool = next(t for t in listed(node)["tools"] if t["name"] == "demo__shout")
    assert tool["origin"] == "mcp:demo" and tool["description"] == "Shout the text."
    assert call(node, "demo__shout", {"text": "hello"}).json()["content"] == "HELLO!"
    (server_pid, _), *others = [c for c in children_of(node.pid) if "demo_mcp.py" in c[1]]
    assert others == []
    # Act: the server dies under the node
    os.kill(server_pid, signal.SIGKILL)
    refused = call(node, "demo__shout", {"text": "anyone?"})
    recorded = wait_for(
        lambda: [e for e in listed(node)["errors"] if e["where"] == "mcp:demo"], 5, "the death in GET /v1/tools"
    )
    back = wait_for(lambda: (r := call(node, "demo__shout", {"text": "again"})).status_code == 200 and r, 15, "back")
    # Assert
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "tool_unavailable"
    assert "MCP server demo" in refused.json()["error"]["message"]
    assert "next try in 1 s" in recorded[0]["error"]
    assert back.json()["content"] == "AGAIN!"
    assert not [e for e in listed(node)["errors"] if e["where"] == "mcp:demo"]  # cleared once it is back
    assert [pid for pid, cmd in children_of(node.pid) if "demo_mcp.py" in cmd] != [server_pid]


def test_tools_list_and_call_through_the_cli(node: Daemon, tmp_path: Path) -> None:
    # Arrange / Act
    listing = run_cli(node.home, node.port, "tools", "list")
    integral = run_cli(node.home, node.port, "tools", "call", "calculate", f"expression={INTEGRAL}")
    typed = run_cli(node.home, node.port, "tools", "call", "demo__shout", "text=123")
    as_json = run_cli(node.home, node.port, "tools", "call", "demo__shout", "--args", '{"text": "json"}')
    refused = run_cli(node.home, node.port, "tools", "call", "calculate", "--args", '{"expr": "1"}')
    no_daemon = run_cli(tmp_path / "empty", free_port(), "mcp", "serve")
    # Assert
    lines = listing.stdout.splitlines()
    assert listing.returncode == 0, listing.stderr
    assert any(line.split()[:2] == ["calculate", "builtin"] for line in lines)
    assert any(line.split()[:3] == ["demo__shout", "mcp:demo", "Shout"] for line in lines)
    assert integral.returncode == 0 and json.loads(integral.stdout)["result"] == "9"
    assert typed.returncode == 0 and typed.stdout.strip() == "123!"  # text for a string parameter, not JSON 123
    assert as_json.stdout.strip() == "JSON!"
    assert refused.returncode == 1 and refused.stderr.startswith("mirador: HTTP 400: calculate:")
    assert no_daemon.returncode == 3 and len(no_daemon.stderr.strip().splitlines()) == 1
    assert "no Mirador daemon is running" in no_daemon.stderr and no_daemon.stdout == ""


def test_mcp_clients_bound_what_a_hostile_server_gives_and_retry_one_that_cannot_start(tmp_path: Path) -> None:
    # Arrange: a server with too many tools, a huge description, a bad schema, an error, a hang; one that cannot start
    script = tmp_path / "hostile.py"
    script.write_text(textwrap.dedent(HOSTILE))
    registry = ToolRegistry()
    errors: list[tuple[str, str]] = []

    def offer(origin: str, tool: Tool) -> None:
        try:
            registry.add(tool)
        except ToolRefused as exc:
            errors.append((origin, exc.detail))

    servers = [
        McpServer(name="hostile", command=[sys.executable, str(script)], timeout_s=2),
        McpServer(name="missing", command=[str(tmp_path / "no-such-server")]),
    ]
    outcomes: dict[str, Any] = {}

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            clients = McpClients(servers, offer, errors)
            await nursery.start(clients.run)
            while not clients.connected() or not any("next try in 2 s" in why for _, why in errors):
                await trio.sleep(0.05)
            for name, arguments in [("fails", {}), ("t7", {"x": 1})]:
                try:
                    await registry.call(f"hostile__{name}", arguments)
                except ToolRefused as exc:
                    outcomes[name] = exc
            outcomes["t8"] = await registry.call("hostile__t8", {})
            outcomes["structured"] = await registry.call("hostile__structured", {})
            try:
                await registry.call("hostile__slow", {})
            except ToolRefused as exc:
                outcomes["slow"] = exc
            nursery.cancel_scope.cancel()

    # Act
    in_trio(body, timeout=30)
    # Assert
    tools = {t.name: t for t in registry.tools()}
    assert len(tools) == MAX_TOOLS - 2  # the first 256, less the two whose schemas are refused
    assert "hostile__bad_schema" not in tools and "hostile__huge" not in tools and "hostile__t299" not in tools
    assert "hostile__dotted_name" in tools
    assert ("mcp:hostile", f"it offers more than {MAX_TOOLS} tools; the first {MAX_TOOLS} are used") in errors
    assert len(tools["hostile__wordy"].description) == MAX_DESCRIPTION + 1  # cut, with an ellipsis
    assert any(
        w == "mcp:hostile" and "hostile__bad_schema: its parameters' schema is invalid" in why for w, why in errors
    )
    assert any(w == "mcp:hostile" and "hostile__huge: its input schema has" in why for w, why in errors)
    assert outcomes["fails"].reason == ToolReason.FAILED and outcomes["fails"].detail == "hostile__fails: it broke"
    assert outcomes["slow"].reason == ToolReason.TIMEOUT
    assert outcomes["t7"].reason == ToolReason.INVALID_ARGUMENTS
    assert len(outcomes["t8"]) < 16_100  # the registry's cut
    assert json.loads(outcomes["structured"]) == {"answer": 42}
    missing = [why for where, why in errors if where == "mcp:missing"]
    assert len(missing) == 1 and missing[0].startswith("could not connect: FileNotFoundError")
    assert not [p for p in children_of(os.getpid()) if "hostile.py" in p[1]]  # stopped with the task


def test_a_wildcard_bind_adds_no_host_name_but_a_real_address_does() -> None:
    # Act
    from node.tools.mcp_server import allowed_hosts

    wildcard, v6, lan = (
        allowed_hosts("0.0.0.0", 8765, []),
        allowed_hosts("::", 8765, []),
        allowed_hosts("192.0.2.7", 1, []),
    )
    # Assert: only loopback names for a wildcard (a client never sends 0.0.0.0 as its Host); the address otherwise
    assert wildcard == v6 == ["127.0.0.1:8765", "localhost:8765", "[::1]:8765"]
    assert "192.0.2.7:1" in lan
