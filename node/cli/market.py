"""`mirador model|chain publish|pull|verify|list|inspect`, `mirador trust`, `mirador audit`, `mirador keys`."""

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from node.adapters.store import TRAINING_FILE
from node.core.home import NodeHome

PASSPHRASE_ENV = "MIRADOR_KEY_PASSPHRASE"


class CliError(Exception):
    """A user error: printed as 'mirador: ...', exit 1."""


def _market(home: NodeHome) -> Any:
    """The node's marketplace: content store from node.toml, registry in state.db, the node identity."""
    from marketplace.artifacts import Marketplace
    from marketplace.content_store import EmbeddedStore, IpfsDaemonStore
    from marketplace.registry import Registry
    from node.core.config import load_config
    from node.core.identity_file import load_or_create_identity

    home.ensure()
    cfg = load_config(home.config_file)
    store: Any = (
        IpfsDaemonStore(cfg.store.ipfs_api) if cfg.store.backend == "ipfs" else EmbeddedStore(home.root / "blocks")
    )
    identity, _ = load_or_create_identity(home.identity_key)
    return Marketplace(home.root / "artifacts", store, Registry(home.state_db), identity)


@contextmanager
def _progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar with bytes and rate, one task per file."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=False
    ) as progress:
        tasks: dict[str, Any] = {}

        def update(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total or None)
            progress.update(tasks[name], completed=done, total=total or None)

        yield update


def _adapter_info(path: Path, home: NodeHome) -> Any:
    """Base digest and LoRA config of an adapter folder or GGUF, for its manifest."""
    from marketplace.manifest import AdapterInfo, LoraInfo
    from node.core.config import load_config
    from node.inference.models import resolve_model
    from node.training.base_model import file_digest
    from node.training.lora_export import GGUF_NAMES

    model_id, gguf = resolve_model(load_config(home.config_file).model)
    folder = path if path.is_dir() else path.parent
    config_file = folder / "adapter_config.json"
    if config_file.is_file():
        cfg = json.loads(config_file.read_text())
        lora = LoraInfo(int(cfg["r"]), float(cfg["lora_alpha"]), sorted(cfg["target_modules"]))
    else:
        import gguf as gguf_py

        gguf_file = path if path.is_file() else folder / "adapter.gguf"
        reader = gguf_py.GGUFReader(gguf_file)
        alpha = float(reader.get_field("adapter.lora.alpha").contents())  # type: ignore[union-attr]
        by_gguf = {v: k for k, v in GGUF_NAMES.items()}
        names = {t.name.split(".")[2] for t in reader.tensors}
        rank = int(next(t.shape[1] for t in reader.tensors if t.name.endswith("lora_a")))
        lora = LoraInfo(rank, alpha, sorted(by_gguf[n] for n in names if n in by_gguf))
    return AdapterInfo(file_digest(gguf), model_id, lora)


def _refuse_memory_trained(path: Path) -> None:
    """Memory never leaves the node: what was trained on it (provenance.json beside it says so) is not published."""
    from node.adapters.store import PROVENANCE_FILE
    from node.memory.training import PROVENANCE

    folder = path if path.is_dir() else path.parent
    try:
        provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    except FileNotFoundError:
        return
    except ValueError:
        raise CliError(f"{folder / PROVENANCE_FILE} is unreadable: not publishing a file of unknown origin") from None
    if isinstance(provenance, dict) and PROVENANCE in provenance:
        raise CliError(
            f"this adapter was trained on the memory namespace {provenance[PROVENANCE]!r}, and memory never leaves "
            "this node: it cannot be published (train one on a data file to share)"
        )


def cmd_publish(home: NodeHome, args: argparse.Namespace) -> int:
    """Sign and publish a model or adapter (file or folder)."""
    path = Path(args.path).resolve()
    _refuse_memory_trained(path)  # whatever kind it is published as
    adapter = _adapter_info(path, home) if args.kind == "adapter" else None
    benchmarks: dict[str, float] = {}
    if not args.no_bench:
        from node.core.config import load_config
        from node.inference.extra_buffers import choose
        from node.inference.models import resolve_model
        from node.market.publish_bench import publish_benchmarks

        cfg = load_config(home.config_file)
        _, base = resolve_model(cfg.model)
        setting = cfg.inference.extra_buffers
        benchmarks = publish_benchmarks(
            path, args.kind, base, lambda p: choose(p, setting, home.probe_cache).use, args.with_training_log
        )
    leave_out = frozenset() if args.with_training_log or args.kind != "adapter" else frozenset({TRAINING_FILE})
    if path.is_dir() and leave_out and (path / TRAINING_FILE).is_file():
        print(f"{TRAINING_FILE} (per-step losses on your data) is not published; --with-training-log to include it")
    with _progress_bar() as bar:
        done = _market(home).publish(
            path,
            name=args.name,
            version=args.version,
            kind=args.kind,
            license=args.license,
            description=args.description,
            adapter=adapter,
            benchmarks=benchmarks,
            progress=bar,
            leave_out=leave_out,
        )
    figures = ", ".join(f"{k} {v:g}" for k, v in benchmarks.items())
    print(f"measured at publish: {figures}" if figures else "no benchmark figures measured")
    print(f"published {done.manifest.name}@{done.manifest.version} ({done.manifest.kind}) as {done.envelope_cid}")
    _announce(home, done.manifest.name)
    return 0


def _announce(home: NodeHome, name: str) -> None:
    """Tell the running node to announce `name` in the DHT (it also re-announces everything when it starts)."""
    client = _daemon(home)
    if client is None:
        print("the node is not running: it announces this artifact on the network when it starts")
        return
    try:
        doc = client.post("/v1/market/announce", {"name": name})
    except RuntimeError as exc:
        print(f"mirador: published locally, but announcing on the network failed: {exc}", file=sys.stderr)
        return
    print(f"announced {name} ({', '.join(doc['versions'])}) on the network ({doc['peers']} peers connected)")


def cmd_chain_publish(home: NodeHome, args: argparse.Namespace) -> int:
    """Validate a chain file and publish it with references to the artifacts it uses."""
    from marketplace.chain import load_chain
    from marketplace.manifest import ArtifactRef

    path = Path(args.path).resolve()
    chain = load_chain(path)
    market = _market(home)
    refs = []
    for name, version in chain.references():
        record = market.registry.find(name, version)
        if record is None:
            raise CliError(f"the chain uses {name}@{version}, which is not installed here: publish or pull it first")
        refs.append(ArtifactRef(name, version, record.root_cid, record.envelope_sha256))
    with _progress_bar() as bar:
        done = market.publish(
            path,
            name=chain.name,
            version=chain.version,
            kind="chain",
            license=args.license,
            description=chain.description,
            references=refs,
            progress=bar,
        )
    print(f"published chain {chain.name}@{chain.version} ({len(refs)} references) as {done.envelope_cid}")
    _announce(home, chain.name)
    return 0


def cmd_chain_run(home: NodeHome, args: argparse.Namespace) -> int:
    """Run an installed chain through the running node: each finished step on stderr, the last one streamed."""
    from node.cli.client import DaemonClient

    body: dict[str, Any] = {"model": f"chain:{args.target}", "messages": [{"role": "user", "content": args.input}]}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature

    def step(event: dict[str, Any]) -> None:
        print(
            f"[step {event['index']}: {event['by']}, {event['completion_tokens']} tokens, {event['seconds']} s]",
            file=sys.stderr,
        )
        print(event["text"], file=sys.stderr)

    for delta in DaemonClient(home).stream_chat(body, on_event={"chain_step": step}):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_pull(home: NodeHome, args: argparse.Namespace) -> int:
    """Pull and verify NAME[@VERSION] or a CID (a chain brings what it references).

    With the node running (and its network marketplace on: P2P enabled, embedded store), the node pulls: it finds
    publishers and providers in the DHT and fetches from peers. Otherwise this machine's content store is used.
    """
    client = _daemon(home)
    if client is not None and client.get("/v1/node/status")["p2p"].get("market", {}).get("enabled"):
        return _pull_through_node(client, args)
    with _progress_bar() as bar:
        done = _market(home).pull(
            args.target, trust_publisher=args.trust_publisher, replace_publisher=args.replace_publisher, progress=bar
        )
    trust = "trusted publisher" if done.publisher_trusted else "UNTRUSTED publisher, allowed by --trust-publisher"
    print(f"pulled {done.manifest.name}@{done.manifest.version} from {done.publisher} ({trust}) into {done.folder}")
    if done.manifest.kind == "adapter" and not args.no_install:
        return _install_adapter(home, done)
    return 0


def _daemon(home: NodeHome) -> Any:
    """A client of the node running on `home`, or None."""
    from node.cli.client import DaemonClient, NotRunningError

    try:
        return DaemonClient(home, timeout_s=3600)
    except NotRunningError:
        return None


def _pull_through_node(client: Any, args: argparse.Namespace) -> int:
    """Ask the running node to pull from the network; show its progress events."""
    body = {
        "target": args.target,
        "trust_publisher": args.trust_publisher,
        "replace_publisher": args.replace_publisher,
        "install": not args.no_install,
    }
    result: dict[str, Any] = {}
    with _progress_bar() as bar:
        for event in client.stream_lines("/v1/market/pull", body):
            if event["event"] == "progress":
                bar(event["file"], event["done"], event["total"])
            else:
                result = event
    if result.get("event") != "done":
        raise CliError(f"refused: {result.get('reason', 'the node ended the pull without a result')}")
    trust = "trusted publisher" if result["publisher_trusted"] else "UNTRUSTED publisher, allowed by --trust-publisher"
    print(f"pulled {result['name']}@{result['version']} from {result['publisher']} ({trust}) into {result['folder']}")
    if result.get("install_error"):
        raise CliError(result["install_error"])
    if result.get("install"):
        print(result["install"])
    return 0


def cmd_search(home: NodeHome, args: argparse.Namespace) -> int:
    """Versions of NAME announced in the DHT by any publisher (needs the running node)."""
    client = _daemon(home)
    if client is None:
        raise CliError("searching the network needs the running node: mirador node start")
    from urllib.parse import quote

    rows = client.get(f"/v1/market/search?name={quote(args.name)}")["results"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no publisher announces {args.name!r} on the network (yet)")
        return 1
    for row in rows:
        mark = "trusted  " if row["trusted"] else "untrusted"
        print(f"{row['name']}@{row['version']:<12} {mark} {row['publisher']}  {row['envelope_cid']}")
    return 0


def _install_adapter(home: NodeHome, done: Any) -> int:
    """Install a pulled adapter into the adapter store (a running node serves it at once) if it fits the base."""
    from node.market.install import InstallRefused, install_pulled_adapter

    try:
        print(install_pulled_adapter(home, done))
    except InstallRefused as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_verify(home: NodeHome, args: argparse.Namespace) -> int:
    """Verify an installed artifact again: signature, trust, every file's digest."""
    name, _, version = args.target.partition("@")
    done = _market(home).verify(name, version or None, trust_publisher=args.trust_publisher)
    print(f"ok: {done.manifest.name}@{done.manifest.version} by {done.publisher}, {len(done.manifest.files)} files")
    return 0


def cmd_list(home: NodeHome, args: argparse.Namespace) -> int:
    """Installed artifacts of one kind."""
    records = [r for r in _market(home).registry.artifacts() if r.kind in args.kinds]
    if args.json:
        print(json.dumps([r.__dict__ for r in records], indent=2))
        return 0
    if not records:
        print("nothing installed")
    for r in records:
        print(f"{r.name}@{r.version:<12} {r.kind:<8} {r.publisher}  {r.root_cid}")
    return 0


def cmd_inspect(home: NodeHome, args: argparse.Namespace) -> int:
    """Print an installed artifact's manifest and provenance."""
    from marketplace.artifacts import describe

    name, _, version = args.target.partition("@")
    print(json.dumps(describe(_market(home).verify(name, version or None, trust_publisher=True)), indent=2))
    return 0


def cmd_trust(home: NodeHome, args: argparse.Namespace) -> int:
    """Add, remove or list trusted publishers."""
    from crypto.identity import PublicKey

    registry = _market(home).registry
    if args.trust_command == "add":
        raw = args.key
        key = PublicKey.from_pem(Path(raw).read_bytes()) if Path(raw).is_file() else PublicKey.from_b64(raw)
        registry.trust(key.fingerprint, key.to_b64(), args.label or "")
        print(f"trusted {key.fingerprint} {args.label or ''}".rstrip())
    elif args.trust_command == "remove":
        if not registry.untrust(args.fingerprint):
            raise CliError(f"{args.fingerprint} was not trusted")
        print(f"no longer trusted: {args.fingerprint}")
    else:
        for t in registry.trusted():
            print(f"{t.fingerprint}  {t.key_b64}  {t.label}")
    return 0


def cmd_audit(home: NodeHome, args: argparse.Namespace) -> int:
    """The newest audit entries: publish, pull, verify, refusals and trust changes."""
    for e in _market(home).registry.audit_log(args.limit):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
        detail = f"  {e.detail}" if e.detail else ""
        print(f"{when}  {e.action:<12} {e.result:<9} {e.artifact or '-':<24} {e.publisher or '-'}{detail}")
    return 0


def _passphrase(confirm: bool) -> str:
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV]
    first = getpass.getpass("passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise CliError("the passphrases differ")
    return first


def cmd_keys(home: NodeHome, args: argparse.Namespace) -> int:
    """Show, export (encrypted backup or public key) or import the node identity."""
    from crypto.identity import Identity, is_encrypted_pem
    from node.core.fsutil import atomic_write_bytes
    from node.core.identity_file import load_or_create_identity

    if args.keys_command == "import":
        data = Path(args.file).read_bytes()
        identity = Identity.from_encrypted_pem(data, _passphrase(False)) if is_encrypted_pem(data) else None
        identity = identity or Identity.from_pem(data)
        if home.identity_key.exists() and not args.force:
            raise CliError(f"{home.identity_key} exists; --force replaces it (the old identity is lost)")
        home.ensure()
        atomic_write_bytes(home.identity_key, identity.to_pem(), 0o600)
        print(f"imported {identity.fingerprint}")
        return 0
    home.ensure()
    identity, _ = load_or_create_identity(home.identity_key)
    if args.keys_command == "export":
        data = identity.public_key.to_pem() if args.public else identity.to_encrypted_pem(_passphrase(True))
        atomic_write_bytes(Path(args.file), data, 0o644 if args.public else 0o600)
        print(f"wrote {'public' if args.public else 'encrypted private'} key of {identity.fingerprint} to {args.file}")
        return 0
    print(f"fingerprint  {identity.fingerprint}")
    print(f"public key   {identity.public_key_b64()}")
    print(f"file         {home.identity_key}")
    return 0


def run(home: NodeHome, func: Callable[[NodeHome, argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command, turning the marketplace's refusals and user errors into one clear line and exit 1."""
    from crypto.identity import KeyFormatError
    from marketplace.artifacts import ArtifactRefused
    from marketplace.chain import ChainError
    from marketplace.content_store import ContentStoreError
    from marketplace.semver import VersionError

    try:
        return func(home, args)
    except ArtifactRefused as exc:
        print(f"mirador: refused: {exc.detail}", file=sys.stderr)
    except (CliError, ChainError, VersionError, KeyFormatError, ContentStoreError, OSError, RuntimeError) as exc:
        print(f"mirador: {exc}", file=sys.stderr)
    return 1


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> list[argparse.ArgumentParser]:
    """Register model, chain, trust, audit and keys; each leaf sets `market_func`. Returns the top parsers."""
    tops = []
    for kind in ("model", "chain"):
        top = sub.add_parser(kind, help=f"publish, pull, verify, list and inspect signed {kind}s")
        s = top.add_subparsers(dest=f"{kind}_command", required=True)
        pub = s.add_parser("publish", help="sign and publish" + (" a chain YAML file" if kind == "chain" else ""))
        pub.add_argument("path")
        if kind == "model":
            pub.add_argument("--name", required=True)
            pub.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
            pub.add_argument("--kind", choices=["model", "adapter"], default="model")
            pub.add_argument("--description", default="")
            pub.add_argument("--no-bench", action="store_true", help="skip measuring generation speed for the manifest")
            pub.add_argument(
                "--with-training-log",
                action="store_true",
                help=f"adapters: also publish {TRAINING_FILE} (per-step losses) and the held-out loss on your data",
            )
        pub.add_argument("--license", default="Apache-2.0")
        pub.set_defaults(market_func=cmd_publish if kind == "model" else cmd_chain_publish)
        pull = s.add_parser("pull", help="fetch and verify NAME[@VERSION] or a CID")
        pull.add_argument("target")
        pull.add_argument("--trust-publisher", action="store_true", help="accept a publisher you do not trust yet")
        pull.add_argument(
            "--replace-publisher",
            action="store_true",
            help="the name is installed from another publisher: switch to this one (its versions are removed)",
        )
        pull.add_argument("--no-install", action="store_true", help="adapters: do not install into the adapter store")
        pull.set_defaults(market_func=cmd_pull)
        search = s.add_parser("search", help="versions of NAME announced on the network, by any publisher")
        search.add_argument("name")
        search.add_argument("--json", action="store_true")
        search.set_defaults(market_func=cmd_search)
        ver = s.add_parser("verify", help="verify an installed artifact again")
        ver.add_argument("target", help="NAME[@VERSION]")
        ver.add_argument("--trust-publisher", action="store_true")
        ver.set_defaults(market_func=cmd_verify)
        ls = s.add_parser("list", help="installed artifacts")
        ls.add_argument("--json", action="store_true")
        ls.set_defaults(market_func=cmd_list, kinds=("model", "adapter") if kind == "model" else ("chain",))
        ins = s.add_parser("inspect", help="manifest and provenance of an installed artifact")
        ins.add_argument("target", help="NAME[@VERSION]")
        ins.set_defaults(market_func=cmd_inspect)
        if kind == "chain":
            runner = s.add_parser("run", help="run an installed chain on an input (the running node streams it)")
            runner.add_argument("target", help="NAME[@VERSION]")
            runner.add_argument("input", help="the chain's {input}")
            runner.add_argument("--max-tokens", type=int, help="cap on each step's answer in tokens")
            runner.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
            runner.set_defaults(market_func=cmd_chain_run)
        tops.append(top)
    trust = sub.add_parser("trust", help="publishers whose artifacts this node accepts")
    t = trust.add_subparsers(dest="trust_command", required=True)
    add = t.add_parser("add", help="trust a publisher's public key (base64, or a PEM file)")
    add.add_argument("key")
    add.add_argument("--label")
    rm = t.add_parser("remove", help="stop trusting a publisher")
    rm.add_argument("fingerprint")
    t.add_parser("list", help="trusted publishers")
    trust.set_defaults(market_func=cmd_trust)
    audit = sub.add_parser("audit", help="the audit log of publishes, pulls, verifications, refusals, trust")
    audit.add_argument("--limit", type=int, default=50)
    audit.set_defaults(market_func=cmd_audit)
    keys = sub.add_parser("keys", help="the node identity: show, export, import")
    k = keys.add_subparsers(dest="keys_command", required=True)
    k.add_parser("show", help="fingerprint and public key")
    exp = k.add_parser("export", help=f"encrypted backup (passphrase asked, or ${PASSPHRASE_ENV}) or --public")
    exp.add_argument("file")
    exp.add_argument("--public", action="store_true", help="only the public key (PEM), to give to others")
    imp = k.add_parser("import", help="replace this node's identity with a backed-up key")
    imp.add_argument("file")
    imp.add_argument("--force", action="store_true")
    keys.set_defaults(market_func=cmd_keys)
    return [*tops, trust, audit, keys]
