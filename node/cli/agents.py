"""`mirador agents list|enable|disable|run|alerts` and `mirador event emit`, through the running node."""

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from node.core.home import NodeHome


def _client(home: NodeHome) -> Any:
    from node.cli.client import DaemonClient

    return DaemonClient(home, timeout_s=300)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def cmd_list(home: NodeHome, args: argparse.Namespace) -> int:
    """Print the agents, their triggers and their last run."""
    status = _client(home).get("/v1/agents")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    if not status["agents"]:
        print(f"no agents (put @mirador.agent classes in {home.agents_dir}/*.py and restart the node)")
    for a in status["agents"]:
        state = "on " if a["enabled"] else "off"
        error = f"  last error: {a['last_error']}" if a["last_error"] else ""
        print(f"{state} {a['name']:<24} runs {a['runs']:<5} last {_when(a['last_run'])}  {', '.join(a['triggers'])}")
        if error:
            print(f"    {error.strip()}")
    for e in status["errors"]:
        print(f"not loaded: {e['where']}: {e['error']}", file=sys.stderr)
    return 0


def cmd_switch(home: NodeHome, args: argparse.Namespace) -> int:
    """Enable or disable an agent."""
    state = _client(home).post(f"/v1/agents/{args.name}/{args.agents_command}", {})
    print(f"{state['name']}: {'enabled' if state['enabled'] else 'disabled'}")
    return 0


def cmd_run(home: NodeHome, args: argparse.Namespace) -> int:
    """Run an agent once now and print its alert or error."""
    result = _client(home).post(f"/v1/agents/{args.name}/run", {"data": _data(args)})
    if not result["ran"] or result["error"]:
        print(f"mirador: agent {args.name}: {result['error']}", file=sys.stderr)
        return 1
    alert = result["alert"]
    print(f"[{alert['level']}] {alert['title']}\n{alert['body']}".rstrip() if alert else "no alert")
    return 0


def cmd_alerts(home: NodeHome, args: argparse.Namespace) -> int:
    """Print the newest alerts."""
    query = f"/v1/agents/alerts?limit={args.limit}" + (f"&agent={args.agent}" if args.agent else "")
    rows = _client(home).get(query)["data"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no alerts")
    for r in reversed(rows):
        body = f"\n    {r['body']}" if r["body"] else ""
        print(f"{_when(r['created'])} [{r['level']}] {r['agent']}: {r['title']}{body}")
    return 0


def _data(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(args.data) if getattr(args, "data", None) else {}
    if not isinstance(data, dict):
        raise ValueError("--data must be a JSON object")
    for pair in getattr(args, "fields", None) or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r}: give key=value")
        try:
            data[key] = json.loads(value)
        except ValueError:
            data[key] = value
    return data


def cmd_emit(home: NodeHome, args: argparse.Namespace) -> int:
    """Emit an event to the node's agents."""
    body: dict[str, Any] = {"name": args.name, "data": _data(args)}
    if args.value is not None:
        body["value"] = args.value
    event = _client(home).post("/v1/events", body)
    print(f"emitted {event['name']} at {_when(event['at'])}")
    return 0


def run(home: NodeHome, args: argparse.Namespace) -> int:
    """Run an agents/event command; errors become one line and exit 1."""
    try:
        return int(args.agents_func(home, args))
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"mirador: {exc}", file=sys.stderr)
    return 1


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> list[argparse.ArgumentParser]:
    """Register `mirador agents ...` and `mirador event ...`."""
    agents = sub.add_parser("agents", help="the node's agents (MIRADOR_HOME/agents/*.py) and their alerts")
    s = agents.add_subparsers(dest="agents_command", required=True)
    lister = s.add_parser("list", help="agents, triggers, last runs, load errors")
    lister.add_argument("--json", action="store_true")
    lister.set_defaults(agents_func=cmd_list)
    for name, help_ in (("enable", "turn an agent on"), ("disable", "turn an agent off (kept across restarts)")):
        p = s.add_parser(name, help=help_)
        p.add_argument("name")
        p.set_defaults(agents_func=cmd_switch)
    runner = s.add_parser("run", help="run an agent once now")
    runner.add_argument("name")
    runner.add_argument("fields", nargs="*", help="key=value pairs for the event's data")
    runner.add_argument("--data", help="the event's data as a JSON object")
    runner.set_defaults(agents_func=cmd_run)
    alerts = s.add_parser("alerts", help="the newest alerts")
    alerts.add_argument("--limit", type=int, default=20)
    alerts.add_argument("--agent", help="only this agent's")
    alerts.add_argument("--json", action="store_true")
    alerts.set_defaults(agents_func=cmd_alerts)

    event = sub.add_parser("event", help="emit events to the node's agents")
    es = event.add_subparsers(dest="event_command", required=True)
    emit = es.add_parser("emit", help="emit an event (agents with event:<name> wake; thresholds read --value)")
    emit.add_argument("name")
    emit.add_argument("fields", nargs="*", help="key=value pairs for the event's data")
    emit.add_argument("--data", help="the event's data as a JSON object")
    emit.add_argument("--value", type=float, help="the metric's value (threshold:<name> <op> <value> triggers)")
    emit.set_defaults(agents_func=cmd_emit)
    return [agents, event]
