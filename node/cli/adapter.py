"""`mirador adapter add|list|use|remove`: manage installed LoRA adapters (a running daemon picks changes up)."""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from node.adapters.check import AdapterRejected
from node.adapters.store import EXTRA_FILES, AdapterStore, UnknownAdapterError
from node.core.home import NodeHome


def open_store(home: NodeHome) -> AdapterStore:
    """The home's adapter store, checked against the configured base model's dimensions."""
    from node.adapters.check import base_dims_of_file
    from node.core.config import load_config
    from node.inference.models import resolve_model

    _, model_path = resolve_model(load_config(home.config_file).model)
    return AdapterStore(home.adapters_dir, base_dims_of_file(model_path))


def cmd_adapter_add(home: NodeHome, args: argparse.Namespace) -> int:
    """Install a GGUF adapter (and optional peft files next to it) as the next version of NAME."""
    src = Path(args.file)
    extras = [src.parent / n for n in EXTRA_FILES if args.with_peft and (src.parent / n).is_file()]
    try:
        installed = open_store(home).install(args.name, src, extras)
    except (AdapterRejected, ValueError) as exc:
        print(f"mirador: adapter refused: {exc}", file=sys.stderr)
        return 1
    print(f"installed {installed.key} ({installed.size_bytes / 1e6:.2f} MB); a running node serves it from now on")
    return 0


def cmd_adapter_list(home: NodeHome, args: argparse.Namespace) -> int:
    """List adapters, their versions and which one serves."""
    store = open_store(home)
    rows: list[dict[str, Any]] = []
    for name in store.names():
        current = store.current(name)
        training = current.folder / "training.json"
        facts = json.loads(training.read_text()) if training.is_file() else {}
        rows.append(
            {
                "name": name,
                "current": current.version,
                "versions": store.versions(name),
                "bytes": current.size_bytes,
                "epsilon": facts.get("epsilon"),
                "heldout_loss": facts.get("heldout_loss_after"),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no adapters installed in {store.root}")
    for r in rows:
        eps = f", ε={r['epsilon']:.2f}" if r["epsilon"] is not None else ""
        print(f"{r['name']:<24} {r['current']:<5} ({len(r['versions'])} versions, {r['bytes'] / 1e6:.2f} MB{eps})")
    return 0


def cmd_adapter_use(home: NodeHome, args: argparse.Namespace) -> int:
    """Serve an older (or newer) installed version of NAME."""
    try:
        chosen = open_store(home).activate(args.name, args.version)
    except (UnknownAdapterError, AdapterRejected, ValueError) as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        return 1
    print(f"{chosen.key} serves now")
    return 0


def cmd_adapter_remove(home: NodeHome, args: argparse.Namespace) -> int:
    """Uninstall every version of NAME."""
    try:
        open_store(home).remove(args.name)
    except (UnknownAdapterError, ValueError) as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        return 1
    print(f"removed {args.name}")
    return 0


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register `mirador adapter ...` (each subcommand sets `adapter_func`); returns the `adapter` parser."""
    adapter = sub.add_parser("adapter", help="install, list, roll back and remove LoRA adapters")
    a_sub = adapter.add_subparsers(dest="adapter_command", required=True)
    add = a_sub.add_parser("add", help="install a GGUF LoRA adapter as the next version of NAME")
    add.add_argument("name")
    add.add_argument("file", help="the adapter's .gguf file")
    add.add_argument("--with-peft", action="store_true", help=f"also keep {', '.join(EXTRA_FILES)} found next to it")
    add.set_defaults(adapter_func=cmd_adapter_add)
    ls = a_sub.add_parser("list", help="installed adapters and their versions")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(adapter_func=cmd_adapter_list)
    use = a_sub.add_parser("use", help="serve another installed version (rollback)")
    use.add_argument("name")
    use.add_argument("version", help="e.g. v1")
    use.set_defaults(adapter_func=cmd_adapter_use)
    rm = a_sub.add_parser("remove", help="uninstall every version of NAME")
    rm.add_argument("name")
    rm.set_defaults(adapter_func=cmd_adapter_remove)
    return adapter
