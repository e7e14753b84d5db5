"""`mirador memory add|search|list|show|forget|export|import|config|namespaces`, through the running node."""

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from node.core.home import NodeHome
from node.memory.record import DEFAULT_NAMESPACE

BATCH = 64
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([mhdw])$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _client(home: NodeHome) -> Any:
    from node.cli.client import DaemonClient

    return DaemonClient(home, timeout_s=300)


def age_seconds(text: str) -> float:
    """'90m', '12h', '30d', '2w' in seconds."""
    found = _AGE.fullmatch(text.strip())
    if not found:
        raise ValueError(f"--older-than {text!r}: expected a number and m, h, d or w (e.g. 30d)")
    return float(found.group(1)) * _UNIT_S[found.group(2)]


def _line(m: dict[str, Any], width: int = 100) -> str:
    day = datetime.fromtimestamp(m["created"], UTC).strftime("%Y-%m-%d")
    text = " ".join(m["text"].split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    score = f" {m['score']:.4f}" if "score" in m else ""
    where = f" {m['source']}#{m['position']}" if m["kind"] == "document" else f" {m['source']}" if m["source"] else ""
    return f"{m['id']}{score} [{m['kind']} {day}{where}] {text}"


def cmd_add(home: NodeHome, args: argparse.Namespace) -> int:
    """Add files (.txt, .md, .pdf, or folders of them) as chunked documents, or texts as notes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from node.memory.documents import chunks, files_under, read_text

    items: list[dict[str, Any]] = []
    for target in args.targets:
        path = Path(target).expanduser()
        if path.exists():
            for f in files_under(path):
                for c in chunks(read_text(f), str(f.resolve())):
                    items.append({"text": c.text, "kind": "document", "source": c.source, "position": c.position})
        else:
            items.append({"text": target, "kind": args.kind, "source": args.source or ""})
    if not items:
        raise ValueError("nothing to add: the files hold no text")
    client = _client(home)
    added = 0
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=True, disable=len(items) <= BATCH or not sys.stderr.isatty()) as progress:
        task = progress.add_task(f"remembering in {args.namespace}", total=len(items))
        for start in range(0, len(items), BATCH):
            batch = items[start : start + BATCH]
            doc = client.post("/v1/memory", {"namespace": args.namespace, "items": batch})
            added += len(doc["data"])
            progress.update(task, advance=len(batch))
            if len(items) == 1:
                print(doc["data"][0]["id"])
    print(f"remembered {added} memor{'y' if added == 1 else 'ies'} in namespace {args.namespace}", file=sys.stderr)
    return 0


def cmd_search(home: NodeHome, args: argparse.Namespace) -> int:
    """The best memories for a query."""
    body = {
        "namespace": args.namespace,
        "query": args.query,
        "limit": args.limit,
        "mode": args.mode,
        "decay": not args.no_decay,
        "diverse": not args.no_mmr,
    }
    hits = _client(home).post("/v1/memory/search", body)["data"]
    if args.json:
        print(json.dumps(hits, indent=2, ensure_ascii=False))
    for h in [] if args.json else hits:
        print(_line(h))
    return 0


def cmd_list(home: NodeHome, args: argparse.Namespace) -> int:
    """A namespace's memories (a page at a time; --all for every one)."""
    client = _client(home)
    offset: str | None = None
    shown = 0
    while True:
        query = {"namespace": args.namespace, "limit": min(args.limit - shown, 500)} | (
            {"offset": offset} if offset else {}
        )
        doc = client.get(f"/v1/memory?{urlencode(query)}")
        for m in doc["data"]:
            print(json.dumps(m, ensure_ascii=False) if args.json else _line(m))
        shown += len(doc["data"])
        offset = doc["next"]
        if offset is None or shown >= args.limit:
            return 0


def cmd_show(home: NodeHome, args: argparse.Namespace) -> int:
    """One memory in full."""
    m = _client(home).get(f"/v1/memory/{args.id}?{urlencode({'namespace': args.namespace})}")
    print(json.dumps(m, indent=2, ensure_ascii=False))
    return 0


def cmd_forget(home: NodeHome, args: argparse.Namespace) -> int:
    """Forget by id, by source, by age or a whole namespace; forgotten text is removed from disk."""
    body: dict[str, Any] = {"namespace": args.namespace}
    if args.ids:
        body["ids"] = args.ids
    if args.source:
        body["source"] = str(Path(args.source).expanduser().resolve()) if Path(args.source).exists() else args.source
    if args.older_than:
        body["before"] = time.time() - age_seconds(args.older_than)
    if args.all:
        body["everything"] = True
    if len(body) == 1:
        raise ValueError("say what to forget: IDs, --source, --older-than or --all")
    doc = _client(home).post("/v1/memory/forget", body)
    print(f"forgot {doc['forgotten']} memor{'y' if doc['forgotten'] == 1 else 'ies'} in namespace {args.namespace}")
    return 0


def cmd_export(home: NodeHome, args: argparse.Namespace) -> int:
    """A namespace's memories as JSON lines (to stdout, or written whole to a file: temp + rename)."""
    lines = _client(home).get_lines(f"/v1/memory/export?{urlencode({'namespace': args.namespace})}")
    text = []
    for m in lines:
        if "error" in m:  # the node could not finish: nothing is written as if it were complete
            raise RuntimeError(f"the export stopped: {m['error']['message']}")
        text.append(json.dumps(m, ensure_ascii=False) + "\n")
    if args.out:
        from node.core.fsutil import atomic_write_text

        atomic_write_text(Path(args.out), "".join(text), mode=0o600)
    else:
        sys.stdout.write("".join(text))
    print(f"exported {len(text)} memories of namespace {args.namespace}", file=sys.stderr)
    return 0


def cmd_import(home: NodeHome, args: argparse.Namespace) -> int:
    """Import an export's JSON lines (ids, times and provenance kept; --namespace moves them)."""
    memories = []
    with open(args.file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                m = json.loads(line)
            except ValueError:
                raise ValueError(f"{args.file}:{number}: not JSON") from None
            if args.namespace:
                m["namespace"] = args.namespace
            memories.append(m)
    client = _client(home)
    for start in range(0, len(memories), 500):
        client.post("/v1/memory/import", {"memories": memories[start : start + 500]})
    print(f"imported {len(memories)} memories")
    return 0


def cmd_config(home: NodeHome, args: argparse.Namespace) -> int:
    """Turn remembering chats on or off in one namespace."""
    doc = _client(home).post(f"/v1/memory/namespaces/{args.name}", {"chats": args.chats == "on"})
    print(f"namespace {doc['namespace']}: chats {'remembered' if doc['chats'] else 'not remembered'}")
    return 0


def cmd_namespaces(home: NodeHome, args: argparse.Namespace) -> int:
    """Every namespace and how many memories it holds."""
    rows = _client(home).get("/v1/memory/namespaces")["data"]
    if args.json:
        print(json.dumps(rows, indent=2))
    for r in [] if args.json else rows:
        print(f"{r['namespace']:<32} {r['memories']:>8} memories, chats {'on' if r['chats'] else 'off'}")
    return 0


def run(home: NodeHome, args: argparse.Namespace) -> int:
    """Run a memory command; errors become one line and exit 1."""
    from node.memory.record import MemoryRefused

    try:
        return int(args.memory_func(home, args))
    except (RuntimeError, ValueError, OSError, MemoryRefused) as exc:
        print(f"mirador: {exc}", file=sys.stderr)
    return 1


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register `mirador memory ...`."""
    top = sub.add_parser("memory", help="the node's long-term memory (it never leaves this node)")
    s = top.add_subparsers(dest="memory_command", required=True)

    def command(name: str, func: Any, help_: str) -> argparse.ArgumentParser:
        p = s.add_parser(name, help=help_)
        p.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE, help="the namespace (default: default)")
        p.set_defaults(memory_func=func)
        return p

    add = command("add", cmd_add, "remember files (.txt .md .pdf, folders) as documents, or texts as notes")
    add.add_argument("targets", nargs="+", help="files, folders, or text")
    add.add_argument("--kind", choices=["note", "correction"], default="note", help="what a text is (default: note)")
    add.add_argument("--source", help="where a text comes from")
    search = command("search", cmd_search, "the memories that best match a query")
    search.add_argument("query")
    search.add_argument("--limit", type=int, default=5)
    search.add_argument("--mode", choices=["hybrid", "dense", "bm25"], default="hybrid")
    search.add_argument("--no-decay", action="store_true", help="ignore how long ago memories were used")
    search.add_argument("--no-mmr", action="store_true", help="rank by relevance alone (no diversity)")
    search.add_argument("--json", action="store_true")
    lister = command("list", cmd_list, "a namespace's memories")
    lister.add_argument("--limit", type=int, default=50)
    lister.add_argument("--json", action="store_true")
    show = command("show", cmd_show, "one memory in full")
    show.add_argument("id")
    forget = command("forget", cmd_forget, "forget memories (removed from disk, not hidden)")
    forget.add_argument("ids", nargs="*", help="memory ids")
    forget.add_argument("--source", help="every memory from this file or source")
    forget.add_argument("--older-than", help="every memory made longer ago than this (90m, 12h, 30d, 2w)")
    forget.add_argument("--all", action="store_true", help="the whole namespace")
    export = command("export", cmd_export, "a namespace's memories as JSON lines")
    export.add_argument("--out", help="file to write (default: stdout)")
    importer = s.add_parser("import", help="import exported JSON lines")
    importer.add_argument("file")
    importer.add_argument("-n", "--namespace", help="put every memory into this namespace instead")
    importer.set_defaults(memory_func=cmd_import)
    config = s.add_parser("config", help="per-namespace settings")
    config.add_argument("name", help="the namespace")
    config.add_argument("--chats", choices=["on", "off"], required=True, help="remember chat exchanges there")
    config.set_defaults(memory_func=cmd_config)
    spaces = s.add_parser("namespaces", help="every namespace and its size")
    spaces.add_argument("--json", action="store_true")
    spaces.set_defaults(memory_func=cmd_namespaces)
    return top
