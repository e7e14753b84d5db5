"""`mirador federation create|join|leave|status|rounds` (P2P engine, through the running node) and
`mirador federation serve|join --engine flower` (Flower's deployment engine)."""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from node.core.config import is_loopback
from node.core.datafiles import import_file
from node.core.home import NodeHome


def _imported(home: NodeHome, data: str) -> str:
    """The user's data file, copied into MIRADOR_HOME/data/imports (the only files the API may name)."""
    source = Path(data).expanduser()
    if not source.is_file():
        from node.cli.client import DaemonRequestError

        raise DaemonRequestError(f"--data {source}: no such file")
    return str(import_file(home, source))


def _client(home: NodeHome) -> Any:
    from node.cli.client import DaemonClient

    return DaemonClient(home, timeout_s=120)


def _options(pairs: list[str]) -> dict[str, float | int]:
    """KEY=NUMBER pairs (training options such as max_length=64)."""
    out: dict[str, float | int] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not key or not value:
            raise ValueError(f"--train-option {pair!r}: expected KEY=NUMBER")
        out[key] = float(value) if "." in value or "e" in value else int(value)
    return out


def cmd_create(home: NodeHome, args: argparse.Namespace) -> int:
    """Create a federation; this node is its creator and first member."""
    body: dict[str, Any] = {
        "name": args.name,
        "mode": args.mode,
        "data": _imported(home, args.data),
        "rank": args.rank,
        "lora": args.lora,
        "update_encoding": args.updates,
        "clip_norm": args.clip_norm,
        "strategy": args.strategy,
        "quorum": args.quorum,
        "min_members": args.min_members,
        "round_deadline_s": args.deadline,
        "local_steps": args.local_steps,
        "epsilon_budget": args.epsilon_budget,
        "admission": args.admission,
        "train_options": _options(args.train_option),
        "personal": args.personal,
    }
    if args.noise_multiplier is not None:
        body["noise_multiplier"] = args.noise_multiplier
    if args.expected_members is not None:
        body["expected_members"] = args.expected_members
    if args.strategy_param:
        body["strategy_params"] = _options(args.strategy_param)
    doc = _client(home).post("/v1/federations", body)
    print(f"created federation {doc['name']} ({doc['mode']}, {doc['strategy']}), id {doc['federation_id']}")
    print(f"others join with: mirador federation join {doc['name']} --creator {doc['creator']} --data FILE")
    return 0


def cmd_join(home: NodeHome, args: argparse.Namespace) -> int:
    """Join a federation (P2P), or run a Flower SuperNode (--engine flower)."""
    if args.engine == "flower":
        return _flower_join(home, args)
    body: dict[str, Any] = {"name": args.name, "creator": args.creator, "role": args.role, "personal": args.personal}
    if args.data:
        body["data"] = _imported(home, args.data)
    if args.invite:
        body["invite"] = Path(args.invite).read_text().strip()
    if args.train_option:
        body["train_options"] = _options(args.train_option)
    doc = _client(home).post("/v1/federations/join", body)
    print(f"joined federation {doc['name']} as {doc['role']}; {len(doc['members'])} members")
    return 0


def cmd_leave(home: NodeHome, args: argparse.Namespace) -> int:
    """Stop taking part in a federation."""
    fid = _resolve(home, args.name)
    _client(home).post(f"/v1/federations/{fid}/leave", {})
    print(f"left federation {args.name}")
    return 0


def _resolve(home: NodeHome, name: str) -> str:
    """The id of the federation called `name` (or with that id) on this node."""
    for f in _client(home).get("/v1/federations")["federations"]:
        if name in (f["name"], f["federation_id"]):
            return str(f["federation_id"])
    raise ValueError(f"this node is in no federation called {name!r}")


def cmd_status(home: NodeHome, args: argparse.Namespace) -> int:
    """Every federation this node is in: rules, members, round, privacy spent against the budget."""
    doc = _client(home).get("/v1/federations")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for f in doc["federations"]:
        state = "active" if f["active"] else "left"
        print(f"{f['name']} ({f['federation_id'][:16]}…) {state}, {f['role']}, mode {f['mode']}, {f['strategy']}")
        print(f"  round {f['global_round']} applied, adapter {f['adapter']}, {len(f['members'])} members")
        print(f"  privacy: ε = {f['epsilon_spent']:.3f} of {f['epsilon_budget']:g} at δ = {f['delta']:g}")
        print(f"  unit of privacy: {f['unit_of_privacy']}")
        status = f["status"]
        if status:
            now = str(status.get("phase", "?"))
            if "round" in status:
                now += f" {status['round']}, aggregated by {str(status.get('aggregator', '?'))[:24]}"
            print(f"  now: {now}")
            if last := status.get("last_abandoned"):
                print(f"  last abandoned: round {last['round']}: {last['reason']}")
            if personal := status.get("personal"):
                before, after = status.get("personal_heldout_loss", ["?", "?"])
                print(f"  personal adapter {personal} (held-out loss {before} → {after} over the global alone)")
                print(f"  serve both as model {status['serve_as']}")
            if refused := status.get("budget_refused"):
                print(f"  round {refused['round']} not trained: {refused['reason']}")
            if error := status.get("personal_error"):
                print(f"  personal adapter not trained: {error}")
    for d in doc["datasets"]:
        print(
            f"dataset {d['dataset'][:16]}: ε = {d['epsilon_spent']:.3f} of {d['epsilon_limit']:g} at δ = {d['delta']:g}"
            f" (privacy.max_epsilon_per_dataset), spent by {', '.join(d['spent_by'])}"
        )
    print(f"ε over all federations: {doc['epsilon_total']:.3f} (δ = 1e-5)")
    return 0


def cmd_rounds(home: NodeHome, args: argparse.Namespace) -> int:
    """A federation's rounds and the updates its aggregators refused."""
    fid = _resolve(home, args.name)
    doc = _client(home).get(f"/v1/federations/{fid}/rounds")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for r in doc["rounds"]:
        extra = f" ({r['reason']})" if r["reason"] else ""
        who = r["aggregator"][:24]
        print(f"round {r['round']:>4} {r['status']:<10} by {who} {len(r['contributors'])} updates{extra}")
    for rej in doc["rejected"]:
        print(f"refused in round {rej['round']}: {rej['member'][:24]} {rej['reason']}: {rej['detail']}")
    return 0


def cmd_serve(home: NodeHome, args: argparse.Namespace) -> int:
    """Run a federation on Flower's deployment engine: a SuperLink and Mirador's ServerApp."""
    from node.fed.flower.engine import TlsFiles, serve

    tls_files = [args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile]
    if args.insecure and any(tls_files):
        raise ValueError("give either --insecure or the --ssl-* files, not both")
    if not args.insecure and not all(tls_files):
        raise ValueError(
            "the SuperLink serves TLS: give --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile "
            "(or --insecure for plain HTTP on a loopback address)"
        )
    if args.insecure and not is_loopback(args.host):
        raise ValueError(f"--insecure serves plain HTTP: only on a loopback address, not {args.host}")
    if (args.enable_supernode_auth or args.supernode_public_key) and args.insecure:
        raise ValueError("SuperNode authentication needs TLS (Flower refuses it with --insecure)")
    tls = None if args.insecure else TlsFiles(*(Path(f).resolve() for f in tls_files))
    config = {"num-rounds": args.rounds, "local-steps": args.local_steps, "out": str(Path(args.out).resolve())}
    summary = serve(
        Path(args.workdir).resolve(),
        config,
        host=args.host,
        port=args.port,
        tls=tls,
        enable_supernode_auth=args.enable_supernode_auth or bool(args.supernode_public_key),
        supernode_public_keys=[Path(k).resolve() for k in args.supernode_public_key],
    )
    print(json.dumps(summary, indent=2))
    return 0


def _flower_join(home: NodeHome, args: argparse.Namespace) -> int:
    """Run a Flower SuperNode that trains on this node's data."""
    from node.fed.flower.engine import join

    if not args.data:
        raise ValueError("a SuperNode trains on local data: give --data FILE")
    if args.insecure and args.root_certificates:
        raise ValueError("give either --insecure or --root-certificates, not both")
    node_config = {
        "data": str(Path(args.data).resolve()),
        "models": str(home.models_dir),
        "home": str(home.root),  # its [privacy] policy and ledger account for every round
        "superlink": args.name,
    }
    code = join(
        Path(args.workdir).resolve(),
        args.name,
        node_config,
        root_certificates=Path(args.root_certificates).resolve() if args.root_certificates else None,
        insecure=bool(args.insecure),  # False: TLS, verified against --root-certificates or the system CAs
        auth_private_key=Path(args.auth_supernode_private_key).resolve() if args.auth_supernode_private_key else None,
        port=args.port,
    )
    return int(code or 0)


def run(home: NodeHome, args: argparse.Namespace) -> int:
    """Run a federation command; errors (a DaemonError is a RuntimeError) become one line and exit 1."""
    try:
        return int(args.fed_func(home, args))
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"mirador: {exc}", file=sys.stderr)
    return 1


def _personal_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-personal",
        dest="personal",
        action="store_false",
        help="do not train a personal adapter (fed-NAME-me) over each new global; by default it is, on the same "
        "data (with DP-SGD, accounted, in dp modes) and served with it as model base:fed-NAME+fed-NAME-me",
    )


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register `mirador federation ...`."""
    top = sub.add_parser("federation", help="private federated learning of shared adapters with other nodes")
    s = top.add_subparsers(dest="federation_command", required=True)
    create = s.add_parser("create", help="create a federation (this node becomes its first member)")
    create.add_argument("name")
    create.add_argument("--data", required=True, help="this node's training data (.txt or .jsonl)")
    create.add_argument("--mode", choices=["dp", "he", "he+dp", "dp-user", "he+dp-user"], default="dp")
    create.add_argument("--rank", type=int, default=4)
    create.add_argument(
        "--lora",
        choices=["ffa", "ab"],
        default="ab",
        help="ab: lora_A and lora_B trained and averaged (learned more in docs/BENCHMARKS.md); ffa: lora_A frozen at "
        "a seeded init, only lora_B trained and averaged (exact aggregation, half the bytes)",
    )
    create.add_argument(
        "--updates",
        choices=["f32", "q8"],
        default="f32",
        help="how plain updates travel: f32 (float32), or q8 (8-bit codes with a scale per tensor, stochastically "
        "rounded: a quarter of the bytes; not under HE)",
    )
    create.add_argument("--clip-norm", type=float, default=1.0)
    create.add_argument("--noise-multiplier", type=float, help="z (default 1.0 in every mode but he)")
    create.add_argument("--strategy", default="fedavg", help="fedavg, fedmedian, fedtrimmedavg, krum, bulyan")
    create.add_argument("--strategy-param", action="append", default=[], metavar="KEY=NUMBER")
    create.add_argument("--quorum", type=int, default=2)
    create.add_argument("--min-members", type=int, default=2)
    create.add_argument(
        "--expected-members", type=int, help="dp-user modes: contributors per round you expect (default: min members)"
    )
    create.add_argument("--deadline", type=int, default=300, help="seconds a round stays open")
    create.add_argument("--local-steps", type=int, default=20)
    create.add_argument("--epsilon-budget", type=float, default=8.0)
    create.add_argument("--admission", choices=["open", "invite"], default="open")
    create.add_argument("--train-option", action="append", default=[], metavar="KEY=NUMBER")
    _personal_flag(create)
    create.set_defaults(fed_func=cmd_create)
    join = s.add_parser("join", help="join a federation (or, --engine flower ADDRESS, run a Flower SuperNode)")
    join.add_argument("name", help="the federation's name (flower: the SuperLink ADDRESS host:port)")
    join.add_argument("--creator", help="the creator's fingerprint (P2P)")
    join.add_argument("--data", help="this node's training data")
    join.add_argument("--role", choices=["member", "aggregator"], default="member")
    join.add_argument("--invite", help="a file holding the invite token (base64)")
    join.add_argument("--train-option", action="append", default=[], metavar="KEY=NUMBER")
    _personal_flag(join)
    join.add_argument("--engine", choices=["p2p", "flower"], default="p2p")
    join.add_argument("--workdir", default=".", help="flower: where logs go")
    join.add_argument("--insecure", action="store_true", help="flower: no TLS (loopback tests only)")
    join.add_argument("--root-certificates", help="flower: the CA (PEM) of the SuperLink (default: system CAs)")
    join.add_argument("--auth-supernode-private-key", help="flower: this SuperNode's key (the SuperLink authenticates)")
    join.add_argument("--port", type=int, help="flower: this SuperNode's ClientAppIo port (one per SuperNode)")
    join.set_defaults(fed_func=cmd_join)
    leave = s.add_parser("leave", help="stop taking part in a federation")
    leave.add_argument("name")
    leave.set_defaults(fed_func=cmd_leave)
    status = s.add_parser("status", help="federations, members, rounds and privacy spent")
    status.add_argument("--json", action="store_true")
    status.set_defaults(fed_func=cmd_status)
    rounds = s.add_parser("rounds", help="a federation's rounds and refused updates")
    rounds.add_argument("name")
    rounds.add_argument("--json", action="store_true")
    rounds.set_defaults(fed_func=cmd_rounds)
    serve = s.add_parser("serve", help="run a federation on Flower's deployment engine (--engine flower)")
    serve.add_argument("--engine", choices=["flower"], default="flower")
    serve.add_argument("--workdir", default=".")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=9092)
    serve.add_argument("--rounds", type=int, default=3)
    serve.add_argument("--local-steps", type=int, default=20)
    serve.add_argument("--out", default="federated-adapter")
    serve.add_argument("--ssl-ca-certfile", help="TLS: the CA (PEM) that signed the SuperLink's certificate")
    serve.add_argument("--ssl-certfile", help="TLS: the SuperLink's certificate (PEM)")
    serve.add_argument("--ssl-keyfile", help="TLS: the SuperLink's private key (PEM)")
    serve.add_argument("--insecure", action="store_true", help="plain HTTP (loopback addresses only)")
    serve.add_argument("--enable-supernode-auth", action="store_true", help="only registered SuperNodes may join")
    serve.add_argument(
        "--supernode-public-key", action="append", default=[], help="a SuperNode's public key to register (repeat)"
    )
    serve.set_defaults(fed_func=cmd_serve)
    return top
