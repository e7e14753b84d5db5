"""`mirador train`: train a personality's adapter on a data file or on the user's feedback, with a progress bar."""

import argparse
import sys
from pathlib import Path
from typing import Any

from node.core.home import NodeHome


def training_config(args: argparse.Namespace) -> dict[str, Any]:
    """The job's `config` from the command line (unset options keep the trainer's defaults)."""
    config: dict[str, Any] = {"targets": args.target}
    for key in ("steps", "rank", "learning_rate", "batch_size", "max_length", "seed"):
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    if args.dp:
        config["dp"] = {"epsilon": args.epsilon, "delta": args.delta, "max_grad_norm": args.max_grad_norm}
    return config


def feedback_records(home: NodeHome, adapter: str) -> list[dict[str, Any]]:
    """Training records from the feedback stored in the node home (see node.training.feedback)."""
    from node.training.feedback import FeedbackDB, training_records

    path = home.state_db
    if not path.exists():
        return []
    db = FeedbackDB(path)
    try:
        return training_records(db.feedback(), adapter)
    finally:
        db.close()


def memory_records(home: NodeHome, namespace: str) -> list[dict[str, Any]]:
    """Training records from a memory namespace: through the running node, or from the store when none runs."""
    import msgspec

    from node.cli.client import DaemonClient, NotRunningError
    from node.memory.record import Memory
    from node.memory.training import memory_records as records_of
    from node.training.feedback import FeedbackDB

    ratings: dict[str, int] = {}
    if home.state_db.exists():
        db = FeedbackDB(home.state_db)
        try:
            ratings = db.ratings()
        finally:
            db.close()
    try:
        client = DaemonClient(home)
    except NotRunningError:
        return records_of(_stored_memories(home, namespace), ratings)
    lines = client.get_lines(f"/v1/memory/export?namespace={namespace}")
    return records_of((msgspec.convert(m, Memory) for m in lines), ratings)


def _stored_memories(home: NodeHome, namespace: str) -> list[Any]:
    """Every memory of `namespace`, read from the store itself (holding the home's lock: no daemon starts meanwhile)."""
    from node.core.config import load_config
    from node.core.runlock import RunLock
    from node.memory.embedder import Embedder
    from node.memory.service import open_backend

    lock = RunLock(home)
    lock.acquire()
    try:
        backend = open_backend(home.memory_dir, load_config(home.config_file).memory, Embedder.dimensions)
        try:
            out: list[Any] = []
            offset = None
            while True:
                page, offset = backend.scroll(namespace, offset, 500)
                out.extend(page)
                if offset is None:
                    return out
        finally:
            backend.close()
    finally:
        lock.release()


def cmd_train(home: NodeHome, args: argparse.Namespace) -> int:
    """Train, show progress and ETA, install the adapter as the next version."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from node.cli.adapter import open_store
    from node.core.config import load_config
    from node.inference.models import resolve_model
    from node.training.privacy import ledger_account
    from node.training.runner import new_run, run_folder, run_training

    if args.dp and args.epsilon is None:
        print("mirador: --dp needs --epsilon (the privacy budget of this run, e.g. --epsilon 8)", file=sys.stderr)
        return 2
    data = Path(args.data).resolve() if args.data else None
    if data is not None and not data.is_file():
        print(f"mirador: --data {data}: no such file", file=sys.stderr)
        return 2
    records = feedback_records(home, args.adapter) if args.from_feedback else None
    if args.from_feedback and not records:
        print(
            f"mirador: no feedback to learn from for {args.adapter!r}: rate answers 4-5 or send corrections "
            "(POST /v1/feedback) first",
            file=sys.stderr,
        )
        return 2
    provenance = None
    if args.from_memory:
        from node.memory.record import check_namespace

        records = memory_records(home, check_namespace(args.namespace))
        if not records:
            print(f"mirador: the memory namespace {args.namespace!r} holds nothing to learn from", file=sys.stderr)
            return 2
        provenance = {"memory": args.namespace}
        print(f"learning from {len(records)} memories of namespace {args.namespace} (this adapter is never published)")
    home.ensure()
    _, gguf = resolve_model(load_config(home.config_file).model)
    store = open_store(home)
    run = new_run(args.adapter)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  eta {task.fields[eta]}"),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(f"training {args.adapter}", total=None, loss="-", eta="-")

        def show(r: Any) -> None:
            label = {"dequantizing": "preparing the base model (once)"}.get(r.status, f"training {r.adapter}")
            progress.update(
                task,
                description=label,
                completed=r.step,
                total=r.steps or None,
                loss=f"{r.loss:.3f}" if r.loss is not None else "-",
                eta=f"{r.eta_s:.0f}s" if r.eta_s is not None else "-",
            )

        try:
            account = ledger_account(home, data)  # the spend is recorded before the adapter is installed
            run = run_training(
                run,
                home,
                gguf,
                store,
                training_config(args),
                data,
                records,
                show,
                account=account,
                provenance=provenance,
            )
        except KeyboardInterrupt:
            print("mirador: training interrupted; nothing was installed", file=sys.stderr)
            return 130
    if run.status != "done":
        print(f"mirador: training failed: {run.error} (log: {run_folder(home, run) / 'job.log'})", file=sys.stderr)
        return 1
    res = run.result or {}
    eps = spent(res, "in the privacy ledger, on this data's account")
    print(
        f"installed {args.adapter}@{run.version}: held-out loss {res.get('heldout_loss_before', float('nan')):.3f} → "
        f"{res.get('heldout_loss_after', float('nan')):.3f} in {res.get('seconds', 0):.0f} s{eps}"
    )
    return 0


def spent(result: dict[str, Any], note: str) -> str:
    """ ", ε = … at δ = … (note)" for a DP run's result, "" for a run without DP."""
    if result.get("epsilon") is None:
        return ""
    return f", ε = {result['epsilon']:.2f} at δ = {result['delta']:g} ({note})"


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register `mirador train`."""
    train = sub.add_parser("train", help="train a LoRA adapter on your data or feedback (installed as a new version)")
    train.add_argument("--adapter", required=True, help="adapter name (a new version is installed)")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help=".txt (paragraphs) or .jsonl ({'text'} or chat {'messages'}) file")
    source.add_argument("--from-feedback", action="store_true", help="learn from corrections and well-rated answers")
    source.add_argument(
        "--from-memory",
        action="store_true",
        help="learn from a memory namespace (corrections and well-rated exchanges first; never published)",
    )
    train.add_argument("-n", "--namespace", default="default", help="with --from-memory: the namespace")
    train.add_argument("--target", choices=["qv", "all"], default="qv", help="adapt q,v (default) or all linear layers")
    train.add_argument("--steps", type=int, help="optimizer steps")
    train.add_argument("--rank", type=int, help="LoRA rank")
    train.add_argument("--learning-rate", type=float, help="learning rate")
    train.add_argument("--batch-size", type=int, help="examples per step")
    train.add_argument("--max-length", type=int, help="tokens per example")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--dp", action="store_true", help="differentially private training (DP-SGD, opacus)")
    train.add_argument("--epsilon", type=float, help="with --dp: target ε of this run")
    train.add_argument("--delta", type=float, default=1e-5, help="with --dp: δ (default 1e-5)")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="with --dp: per-example clipping norm")
    return train
