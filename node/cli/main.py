"""The `mirador` command line."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from node import __version__
from node.core.home import HOME_ENV, NodeHome

EXIT_NOT_RUNNING = 3


def _home(args: argparse.Namespace) -> NodeHome:
    return NodeHome.from_env(args.home)


def cmd_node_start(args: argparse.Namespace) -> int:
    """Start the daemon in the foreground, or in the background with --detach."""
    home = _home(args)
    if args.detach:
        return _start_detached(home, args)
    if not args.no_supervisor:
        from node.supervisor import run_supervised

        home.ensure()
        daemon_argv = ["--home", str(home.root), "node", "start"]
        if args.profile:
            daemon_argv += ["--profile", args.profile]
        return run_supervised(daemon_argv, home.log_file)
    from node.daemon import StartOptions, run_daemon  # heavy imports only when needed

    return run_daemon(home, StartOptions(profile=args.profile))


def _start_detached(home: NodeHome, args: argparse.Namespace) -> int:
    from node.core.runlock import running_daemon

    if (info := running_daemon(home)) is not None:
        print(f"mirador: a daemon (pid {info.pid}) is already running on {home.root}", file=sys.stderr)
        return 1
    home.ensure()
    cmd = [sys.executable, "-m", "node.cli", "--home", str(home.root), "node", "start"]
    if args.profile:
        cmd += ["--profile", args.profile]
    with open(os.open(home.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if child.poll() is not None:
            print(
                f"mirador: the daemon exited with code {child.returncode}; its log ({home.log_file}) ends with:",
                file=sys.stderr,
            )
            print(_tail(home.log_file), file=sys.stderr)
            return child.returncode or 1
        info = running_daemon(home)  # the daemon is the child's child (node.supervisor)
        if info is not None and _healthy(info.url):
            print(f"mirador: daemon started (pid {info.pid}), API at {info.url}, log in {home.log_file}")
            return 0
        time.sleep(0.2)
    print(
        f"mirador: the daemon (pid {child.pid}) did not answer within {args.wait:.0f} s; see {home.log_file}",
        file=sys.stderr,
    )
    return 1


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cmd_node_stop(args: argparse.Namespace) -> int:
    """Ask the daemon to stop (SIGTERM) and wait until it has."""
    from node.core.runlock import is_locked, running_daemon

    home = _home(args)
    info = running_daemon(home)
    if info is None:
        print(f"mirador: no daemon is running on {home.root}")
        return EXIT_NOT_RUNNING
    os.kill(info.pid, signal.SIGKILL if args.force else signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not is_locked(home):
            print(f"mirador: daemon (pid {info.pid}) stopped")
            return 0
        time.sleep(0.1)
    print(
        f"mirador: daemon (pid {info.pid}) still running after {args.timeout:.0f} s; "
        "`mirador node stop --force` kills it",
        file=sys.stderr,
    )
    return 1


def cmd_node_status(args: argparse.Namespace) -> int:
    """Show whether the daemon runs, and its profile, model and load."""
    from node.cli.client import DaemonClient, NotRunningError

    home = _home(args)
    try:
        status = DaemonClient(home, timeout_s=10).get("/v1/node/status")
    except NotRunningError as exc:
        print(f"mirador: {exc}")
        return EXIT_NOT_RUNNING
    except Exception as exc:
        print(f"mirador: the daemon does not answer: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(_format_status(status))
    return 0


def cmd_node_peers(args: argparse.Namespace) -> int:
    """This node's peer id and addresses, and the peers it is connected to."""
    return _p2p_call(args, lambda c: c.get("/v1/node/peers"))


def cmd_node_connect(args: argparse.Namespace) -> int:
    """Dial a peer by its full multiaddr."""
    return _p2p_call(args, lambda c: c.post("/v1/node/connect", {"addr": args.multiaddr}))


def _p2p_call(args: argparse.Namespace, call: Any) -> int:
    from node.cli.client import DaemonClient, NotRunningError

    try:
        doc = call(DaemonClient(_home(args), timeout_s=30))
    except NotRunningError as exc:
        print(f"mirador: {exc}")
        return EXIT_NOT_RUNNING
    except Exception as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        return 1
    if "listen_addrs" in doc:
        print(f"peer id   {doc['peer_id']}")
        for addr in doc["listen_addrs"]:
            print(f"listening {addr}")
    else:
        print(f"connected to {doc['peer_id']}")
    peers = doc.get("peers", [])
    print(f"{len(peers)} peer(s) connected" + "".join(f"\n  {p}" for p in peers))
    return 0


def _format_status(s: dict[str, Any]) -> str:
    n, p, m, e, a = s["node"], s["profile"], s["model"], s["engine"], s["api"]
    cache = s["adapters"]["cache"]
    return "\n".join(
        [
            f"running      pid {n['pid']}, up {n['uptime_s']:.0f} s, version {n['version']}",
            f"home         {n['home']}",
            f"identity     {n['identity']}",
            f"profile      {p['name']}: {p['threads']} threads, context {p['n_ctx']}, max tokens {p['max_tokens']}, "
            f"batch {p['batch_size']}, {p['slots']} slots, adapter cache {p['adapter_cache_mb']} MB",
            f"model        {m['id']} ({m['description']}, {m['n_params'] / 1e6:.0f}M params) {m['path']}; "
            f"extra buffers {'on' if m.get('extra_buffers') else 'off'}",
            f"engine       {e['active']} generating, {e['waiting']} waiting, {e['completed']} done "
            f"({e.get('stopped', 0)} stopped early)",
            f"personalities {', '.join(s['personalities']['names']) or '(none)'}"
            + (f"  MANIFEST ERROR: {s['personalities']['error']}" if s["personalities"]["error"] else ""),
            f"adapters     {len(s['adapters']['installed'])} installed, {len(cache['loaded'])} loaded "
            f"({cache['used_bytes'] / 1e6:.1f} of {cache['budget_bytes'] / 1e6:.0f} MB), {cache['loads']} loads, "
            f"{cache['evictions']} evictions",
            f"training     {s['training']['running'] or 'idle'}",
            f"p2p          {s['p2p'].get('peer_id', 'disabled')}, {len(s['p2p'].get('peers', []))} peers"
            + _p2p_details(s["p2p"]),
            f"federations  {_federations_line(s.get('federations', []))}",
            f"api          http://{a['host']}:{a['port']}  "
            f"inference: {'bearer token' if a['auth'] else 'open (loopback)'}, "
            f"changes: {'token' if a.get('changes_need_token') else 'open'}",
        ]
    )


def _federations_line(feds: list[dict[str, Any]]) -> str:
    """Each federation's round and ε spent, for the status."""
    if not feds:
        return "(none)"
    parts = []
    for f in feds:
        spent = f.get("epsilon_spent")
        eps = f", ε {spent:g} of {f['epsilon_budget']:g}" if spent is not None else ""
        parts.append(f"{f['name']} ({f['mode']}, round {f['global_round']}{eps})")
    return "; ".join(parts)


def _p2p_details(p2p: dict[str, Any]) -> str:
    """DHT and gossip figures for the status line (empty when P2P is off)."""
    if not p2p.get("enabled"):
        return ""
    dht, notices = p2p.get("dht", {}), p2p.get("notices", {})
    refused = sum(notices.get("refused", {}).values())
    return (
        f", {dht.get('routing_table', 0)} in the DHT routing table, {dht.get('records', 0)} records held; "
        f"notices {notices.get('accepted', 0)} accepted, {refused} refused, "
        f"{len(notices.get('blacklisted', {}))} peers blacklisted"
    )


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with the running node: one question, or an interactive session."""
    from node.cli.chat import run_chat

    return run_chat(_home(args), args)


def cmd_adapter(args: argparse.Namespace) -> int:
    """Dispatch `mirador adapter ...`."""
    from node.core.config import ConfigError

    try:
        code: int = args.adapter_func(_home(args), args)
    except ConfigError as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        return 2
    return code


def _with_config(command: Any, args: argparse.Namespace) -> int:
    """Run a command that reads node.toml; a config error is one line and exit 2."""
    from node.core.config import ConfigError

    try:
        code: int = command(_home(args), args)
    except ConfigError as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        return 2
    return code


def cmd_train(args: argparse.Namespace) -> int:
    """Dispatch `mirador train`."""
    from node.cli.train import cmd_train as train

    return _with_config(train, args)


def cmd_create(args: argparse.Namespace) -> int:
    """Dispatch `mirador create`."""
    from node.cli.create import cmd_create as create

    return _with_config(create, args)


def cmd_market(args: argparse.Namespace) -> int:
    """Dispatch the marketplace commands (model, chain, trust, audit, keys)."""
    from node.cli.market import run
    from node.core.config import ConfigError

    try:
        return run(_home(args), args.market_func, args)
    except ConfigError as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        return 2


def cmd_federation(args: argparse.Namespace) -> int:
    """Dispatch `mirador federation ...`."""
    from node.cli.fed import run

    return run(_home(args), args)


def cmd_memory(args: argparse.Namespace) -> int:
    """Dispatch `mirador memory ...`."""
    from node.cli.memory import run

    return run(_home(args), args)


def cmd_tools(args: argparse.Namespace) -> int:
    """Dispatch `mirador tools ...` and `mirador mcp ...`."""
    from node.cli.tools import run

    return run(_home(args), args)


def cmd_agents(args: argparse.Namespace) -> int:
    """Dispatch `mirador agents ...` and `mirador event ...`."""
    from node.cli.agents import run

    return run(_home(args), args)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Dispatch `mirador doctor`."""
    from node.cli.doctor import cmd_doctor as doctor

    return doctor(_home(args), args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `mirador`."""
    parser = argparse.ArgumentParser(
        prog="mirador", description="Mirador: a P2P federated-learning node for personal LLMs"
    )
    parser.add_argument("--version", action="version", version=f"mirador {__version__}")
    parser.add_argument("--home", help=f"node home folder (default: ${HOME_ENV} or ~/.mirador)")
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run and control the node daemon")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    start = node_sub.add_parser("start", help="start the daemon (foreground unless --detach)")
    start.add_argument("--profile", choices=["battery", "balanced", "performance"], help="energy profile")
    start.add_argument("--detach", action="store_true", help="run in the background (pid file, log in the home)")
    start.add_argument("--wait", type=float, default=60.0, help="with --detach: seconds to wait for the API")
    # the daemon itself, in this process; `node start` runs it so as a supervised child (node.supervisor)
    start.add_argument("--no-supervisor", action="store_true", help=argparse.SUPPRESS)
    start.set_defaults(func=cmd_node_start)
    stop = node_sub.add_parser("stop", help="stop the daemon (SIGTERM, then wait)")
    stop.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for it to exit")
    stop.add_argument("--force", action="store_true", help="SIGKILL instead of a graceful stop")
    stop.set_defaults(func=cmd_node_stop)
    status = node_sub.add_parser("status", help="is the daemon running, with which profile and model")
    status.add_argument("--json", action="store_true", help="print the raw status document")
    status.set_defaults(func=cmd_node_status)
    peers = node_sub.add_parser("peers", help="this node's peer id and addresses, and its connected peers")
    peers.set_defaults(func=cmd_node_peers)
    connect = node_sub.add_parser("connect", help="connect to a peer (full multiaddr with /p2p/PEER_ID)")
    connect.add_argument("multiaddr")
    connect.set_defaults(func=cmd_node_connect)

    chat = sub.add_parser("chat", help="chat with the running node (interactive without a question)")
    chat.add_argument("question", nargs="?", help="ask one question and stream the answer")
    chat.add_argument("--model", default="base", help="model or personality (default: base)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-tokens", type=int, help="cap on the answer's length in tokens")
    chat.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    chat.add_argument("--tools", help="node tools the model may call, comma-separated (e.g. run_python,calculate)")
    chat.set_defaults(func=cmd_chat)

    from node.cli.adapter import add_parser as add_adapter_parser

    add_adapter_parser(sub).set_defaults(func=cmd_adapter)
    from node.cli.train import add_parser as add_train_parser

    add_train_parser(sub).set_defaults(func=cmd_train)
    from node.cli.create import add_parser as add_create_parser

    add_create_parser(sub).set_defaults(func=cmd_create)
    from node.cli.market import add_parsers as add_market_parsers

    for market_parser in add_market_parsers(sub):
        market_parser.set_defaults(func=cmd_market)
    from node.cli.fed import add_parser as add_fed_parser

    add_fed_parser(sub).set_defaults(func=cmd_federation)
    from node.cli.memory import add_parser as add_memory_parser

    add_memory_parser(sub).set_defaults(func=cmd_memory)
    from node.cli.tools import add_parsers as add_tool_parsers

    for tool_parser in add_tool_parsers(sub):
        tool_parser.set_defaults(func=cmd_tools)
    from node.cli.agents import add_parsers as add_agent_parsers

    for agent_parser in add_agent_parsers(sub):
        agent_parser.set_defaults(func=cmd_agents)
    from node.cli.doctor import add_parser as add_doctor_parser

    add_doctor_parser(sub).set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mirador` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from node.cli.client import DaemonError, NotRunningError  # imported late: httpx is slow to import

        if not isinstance(exc, DaemonError):
            raise
        print(f"mirador: {exc}", file=sys.stderr)  # every client command: one line, never a traceback
        return EXIT_NOT_RUNNING if isinstance(exc, NotRunningError) else 1
    return code
