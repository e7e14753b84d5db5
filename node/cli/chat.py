"""`mirador chat`: stream answers from the running node to the terminal."""

import argparse
import sys
from typing import Any

from node.cli.client import DaemonClient, NotRunningError
from node.core.home import NodeHome


def _request(args: argparse.Namespace, messages: list[dict[str, str]]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": args.model, "messages": messages}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if getattr(args, "tools", None):
        body["node_tools"] = [t.strip() for t in args.tools.split(",") if t.strip()]
    return body


def _tool_event(event: dict[str, Any]) -> None:
    """A tool call or result the node ran, shown on stderr (dim) beside the answer."""
    if event["type"] == "call":
        line = f"[{event['name']}({event['arguments']})]"
    else:
        content = event["content"] if len(event["content"]) <= 400 else event["content"][:400] + "…"
        line = f"[{event['name']} -> {content}]"
    sys.stderr.write(f"\x1b[2m{line}\x1b[0m\n" if sys.stderr.isatty() else line + "\n")
    sys.stderr.flush()


def _ask(client: DaemonClient, args: argparse.Namespace, messages: list[dict[str, str]]) -> str:
    parts: list[str] = []
    for delta in client.stream_chat(_request(args, messages), on_event={"tool_event": _tool_event}):
        parts.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)


def run_chat(home: NodeHome, args: argparse.Namespace) -> int:
    """One question (args.question) or an interactive session; returns an exit code."""
    try:
        client = DaemonClient(home)
    except NotRunningError as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        return 3
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    try:
        if args.question:
            _ask(client, args, [*messages, {"role": "user", "content": args.question}])
            return 0
        print("Mirador chat: type a message; /reset forgets the conversation, /exit or Ctrl-D quits.")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if not line:
                continue
            if line in {"/exit", "/quit"}:
                return 0
            if line == "/reset":
                messages = messages[:1] if args.system else []
                continue
            messages.append({"role": "user", "content": line})
            sys.stdout.write("node> ")
            answer = _ask(client, args, messages)
            messages.append({"role": "assistant", "content": answer})
    except RuntimeError as exc:
        print(f"\nmirador: {exc}", file=sys.stderr)
        return 1
