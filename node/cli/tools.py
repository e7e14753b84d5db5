"""`mirador tools list|call` and `mirador mcp serve`, through the running node."""

import argparse
import json
import shutil
import sys
from typing import Any
from urllib.parse import quote

from node.core.home import NodeHome

EXIT_USAGE = 2


def _client(home: NodeHome) -> Any:
    from node.cli.client import DaemonClient

    return DaemonClient(home, timeout_s=3600)


def _first_line(text: str, width: int) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= width else line[: width - 1] + "…"


def cmd_list(home: NodeHome, args: argparse.Namespace) -> int:
    """The node's tools (name, origin, description), then what failed to load."""
    doc = _client(home).get("/v1/tools")
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    tools = doc["tools"]
    name_w = max((len(t["name"]) for t in tools), default=4)
    origin_w = max((len(t["origin"]) for t in tools), default=6)
    width = max(20, shutil.get_terminal_size((120, 24)).columns - name_w - origin_w - 4)
    for t in tools:
        print(f"{t['name']:<{name_w}}  {t['origin']:<{origin_w}}  {_first_line(t['description'], width)}")
    if doc["errors"]:
        print(f"\n{len(doc['errors'])} problem{'s' if len(doc['errors']) != 1 else ''} loading tools:")
        for e in doc["errors"]:
            print(f"  {e['where']}: {e['error']}")
    return 0


def _value(raw: str, schema: dict[str, Any]) -> Any:
    """A key=value's value: kept as text where the tool's schema wants a string, else JSON if it parses."""
    kinds = schema.get("type")
    if kinds == "string" or (isinstance(kinds, list) and "string" in kinds):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def call_arguments(args_json: str | None, pairs: list[str], parameters: dict[str, Any]) -> dict[str, Any]:
    """The arguments of `tools call`: --args JSON, then each key=value over it (typed by the tool's schema)."""
    arguments: dict[str, Any] = {}
    if args_json is not None:
        try:
            arguments = json.loads(args_json)
        except ValueError as exc:
            raise ValueError(f"--args is not JSON: {exc}") from None
        if not isinstance(arguments, dict):
            raise ValueError("--args must be a JSON object")
    properties = parameters.get("properties") or {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r}: give arguments as key=value (or --args JSON)")
        arguments[key] = _value(raw, properties.get(key) or {})
    return arguments


def cmd_call(home: NodeHome, args: argparse.Namespace) -> int:
    """Run one tool and print its result text."""
    from node.cli.client import DaemonRequestError

    client = _client(home)
    parameters: dict[str, Any] = {}
    if args.pairs:  # the schema says which values are text
        found = [t for t in client.get("/v1/tools")["tools"] if t["name"] == args.name]
        parameters = found[0]["parameters"] if found else {}
    try:
        arguments = call_arguments(args.args, args.pairs, parameters)
    except ValueError as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        doc = client.post(f"/v1/tools/{quote(args.name, safe='')}", {"arguments": arguments})
    except DaemonRequestError as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        return 1
    print(doc["content"])
    return 0


def cmd_mcp_serve(home: NodeHome, args: argparse.Namespace) -> int:
    """Serve the node's tools over MCP (stdio, or streamable HTTP with --http) until stopped."""
    import logging

    import trio

    from node.tools.mcp_server import serve_http, serve_stdio

    _client(home).http.close()  # no daemon: one line and exit 3 (node.cli.main), before anything is served
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="mirador mcp: %(message)s")
    if not args.http:
        trio.run(serve_stdio, home)
        return 0
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"mirador: MCP server at http://{host}:{args.port}/mcp "
        f"(send Authorization: Bearer <the token in {home.api_token}>); Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    trio.run(serve_http, home, args.host, args.port, args.allow_host)
    return 0


def run(home: NodeHome, args: argparse.Namespace) -> int:
    """Run a tools or mcp command; a daemon error propagates to `mirador` (one line, exit 1, or 3 without daemon)."""
    return int(args.tools_func(home, args))


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> list[argparse.ArgumentParser]:
    """Register `mirador tools ...` and `mirador mcp ...`; the top-level parsers added."""
    tools = sub.add_parser("tools", help="the node's tools (built-in, yours, MCP servers')")
    t = tools.add_subparsers(dest="tools_command", required=True)
    lister = t.add_parser("list", help="every tool the node offers, and what failed to load")
    lister.add_argument("--json", action="store_true", help="print GET /v1/tools as it is")
    lister.set_defaults(tools_func=cmd_list)
    call = t.add_parser("call", help="run one tool and print its result")
    call.add_argument("name", help="the tool's name (see `mirador tools list`)")
    call.add_argument("pairs", nargs="*", metavar="key=value", help="an argument (JSON unless the tool wants text)")
    call.add_argument("--args", help="the arguments as a JSON object")
    call.set_defaults(tools_func=cmd_call)

    mcp = sub.add_parser("mcp", help="the node as an MCP server (for Claude Desktop, IDEs, agents)")
    m = mcp.add_subparsers(dest="mcp_command", required=True)
    serve = m.add_parser("serve", help="serve the running node's tools over MCP (stdio unless --http)")
    serve.add_argument("--http", action="store_true", help="streamable HTTP at http://HOST:PORT/mcp instead of stdio")
    serve.add_argument("--host", default="127.0.0.1", help="with --http: the address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="with --http: the port (default: 8765)")
    serve.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="with --http: another Host header name to answer (loopback names always are)",
    )
    serve.set_defaults(tools_func=cmd_mcp_serve)
    return [tools, mcp]
