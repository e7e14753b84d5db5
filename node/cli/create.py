"""`mirador create DESCRIPTION --examples FILES...`: a personality from a sentence and some example files.

Phases, each with a progress bar: read and chunk the examples (a seeded share of the chunks is held out, never
seen); synthesise question/answer pairs grounded in the other chunks with the base model itself (node.create.synth);
train an adapter on them with the existing trainer (held-out loss on the unseen chunks measured before and after);
install it and add the personality, with `load_on` keywords drawn from the description and the examples; with
`--publish`, sign and publish it. `--dry-run` stops after the synthesis and shows the pairs."""

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from node.core.home import NodeHome


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
    )


def _synthesise(args: argparse.Namespace, gguf: Path, home: NodeHome, chunks: list[Any]) -> tuple[list[Any], Any]:
    """Load the base model in this process and ask it for questions about every chunk."""
    import trio

    from node.core.config import load_config
    from node.core.profiles import effective_settings
    from node.create.synth import synthesise
    from node.inference.engine import InferenceEngine
    from node.inference.extra_buffers import choose
    from node.inference.models import BaseModel

    cfg = load_config(home.config_file)
    settings = effective_settings(cfg)
    model = BaseModel("create", gguf, extra_buffers=choose(gguf, cfg.inference.extra_buffers, home.probe_cache).use)
    try:
        with _progress() as progress:
            task = progress.add_task("synthesising pairs", total=len(chunks) * args.per_chunk)

            async def run() -> tuple[list[Any], Any]:
                engine = InferenceEngine(model.llama, settings)
                async with trio.open_nursery() as nursery:
                    await nursery.start(engine.run)
                    done = await synthesise(
                        engine,
                        model,
                        args.description,
                        chunks,
                        args.per_chunk,
                        args.seed,
                        lambda n: progress.update(task, completed=n),
                    )
                    nursery.cancel_scope.cancel()
                return done

            return trio.run(run)
    finally:
        model.close()


def cmd_create(home: NodeHome, args: argparse.Namespace) -> int:
    """Create the personality (see the module docstring); 0 on success, 2 on bad input, 1 on a failed phase."""
    from node.adapters.personalities import NAME_RE, ManifestError, PersonalitySpec, add_personality, load_manifest
    from node.cli.adapter import open_store
    from node.cli.train import spent
    from node.core.config import load_config
    from node.create.keywords import keywords
    from node.create.sources import ExamplesRefused, example_files, examples_digest, read_chunks, split_chunks
    from node.inference.models import BASE_ALIAS, resolve_model
    from node.training.privacy import ledger_account
    from node.training.runner import new_run, run_folder, run_training

    timings: dict[str, float] = {}
    if args.dp and args.epsilon is None:
        print("mirador: --dp needs --epsilon (the privacy budget of this run, e.g. --epsilon 8)", file=sys.stderr)
        return 2
    if args.publish and not (args.dp or args.public_examples):
        print(
            "mirador: --publish shares an adapter trained on your examples: train it with --dp --epsilon E, or say "
            "the examples are public with --public-examples",
            file=sys.stderr,
        )
        return 2

    name = args.name or "-".join(re.findall(r"[a-z0-9]+", args.description.casefold())[:3]) or "created"
    if not re.match(NAME_RE, name):
        print(f"mirador: --name {name!r}: letters, digits, '_', '.', '-' (at most 64)", file=sys.stderr)
        return 2
    try:
        paths = example_files([Path(p).expanduser().resolve() for p in args.examples])
    except OSError as exc:
        print(f"mirador: --examples: {exc}", file=sys.stderr)
        return 2
    model_id, served = resolve_model(load_config(home.config_file).model)
    gguf = Path(args.base).expanduser().resolve() if args.base else served
    if not gguf.is_file():
        print(f"mirador: --base {gguf}: no such GGUF file", file=sys.stderr)
        return 2
    if gguf != served.resolve() and not args.dry_run:
        print(
            f"mirador: --base {gguf}: this node serves {served.name}, and a personality runs on the served model "
            "(try the other base's questions with --dry-run)",
            file=sys.stderr,
        )
        return 2
    try:
        taken = any(p.name == name for p in load_manifest(home.personalities_file, (model_id, BASE_ALIAS)))
    except ManifestError as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        return 2
    if taken and not args.dry_run:
        print(f"mirador: a personality {name!r} exists already; choose another --name", file=sys.stderr)
        return 2

    # 1. the examples
    started = time.monotonic()
    try:
        with _progress() as progress:
            task = progress.add_task("reading examples", total=len(paths))
            chunks = read_chunks(paths, lambda: progress.advance(task))
        learn, held = split_chunks(chunks, args.held_out, args.seed)
    except ExamplesRefused as exc:
        print(f"mirador: {exc.detail}", file=sys.stderr)
        return 2
    timings["read_s"] = time.monotonic() - started
    print(f"{len(chunks)} chunks from {len(paths)} files: {len(learn)} to learn from, {len(held)} held out unseen")

    # 2. the pairs
    per_chunk = 1 if args.dp else args.per_chunk  # with DP, one example per chunk: the unit of privacy is a chunk
    args.per_chunk = per_chunk
    started = time.monotonic()
    pairs, report = _synthesise(args, gguf, home, learn)
    timings["synthesise_s"] = time.monotonic() - started
    print(report.summary())
    if args.dry_run:
        for pair in pairs:
            print(f"\n[{pair.source} #{pair.chunk}] Q: {pair.question}\nA: {pair.answer[:300]}")
        print(f"\ndry run: nothing trained or installed ({_times(timings)})")
        return 0
    if len(pairs) < 2:
        print("mirador: fewer than 2 pairs were kept: give more (or longer) examples", file=sys.stderr)
        return 1

    # 3. the adapter
    config: dict[str, Any] = {"targets": "qv", "steps": args.steps, "seed": args.seed, "max_length": 256}
    if args.dp:
        config["dp"] = {"epsilon": args.epsilon, "delta": args.delta, "max_grad_norm": 1.0}
    # the pairs teach the questions' form, the chunks' own text the domain; with DP one example per chunk (its pair)
    records = [p.record() for p in pairs] + ([] if args.dp else [{"text": c.text} for c in learn])
    home.ensure()
    store = open_store(home)
    run = new_run(name)
    digest = examples_digest(paths)
    # published with the adapter: what it is for and how it was trained, never the examples' names or digests
    provenance = {"created": {"description": args.description, "example_files": len(paths)}, "dp": bool(args.dp)}
    started = time.monotonic()
    with _progress() as progress:
        task = progress.add_task(f"training {name}", total=None)

        def show(r: Any) -> None:
            label = {"dequantizing": "preparing the base model (once)"}.get(r.status, f"training {name}")
            progress.update(task, description=label, completed=r.step, total=r.steps or None)

        run = run_training(
            run,
            home,
            gguf,
            store,
            config,
            None,
            records,
            show,
            account=ledger_account(home, None, digest),
            provenance=provenance,
            evaluate=[{"text": c.text} for c in held],
        )
    timings["train_s"] = time.monotonic() - started
    if run.status != "done":
        print(f"mirador: training failed: {run.error} (log: {run_folder(home, run) / 'job.log'})", file=sys.stderr)
        return 1
    res = run.result or {}

    # 4. the personality
    words = keywords(args.description, chunks)
    spec = PersonalitySpec(base=BASE_ALIAS, adapter=name, load_on=words, description=args.description)
    try:
        add_personality(home.personalities_file, name, spec, (model_id, BASE_ALIAS))
    except ManifestError as exc:
        print(f"mirador: the adapter {name}@{run.version} is installed, but the personality was not added: {exc}")
        return 1
    eps = spent(res, "one chunk of the examples is the unit; in the privacy ledger on the examples' account")
    print(
        f"created personality {name} ({name}@{run.version}): held-out loss on {res.get('eval_examples')} unseen "
        f"chunks {res.get('eval_loss_before', float('nan')):.3f} → {res.get('eval_loss_after', float('nan')):.3f}"
        f"{eps}\nroutes on: {', '.join(words)}"
    )

    # 5. publish
    if args.publish:
        from node.cli.market import cmd_publish

        started = time.monotonic()
        folder = store.get(name, str(run.version)).folder
        publish = argparse.Namespace(
            path=str(folder),
            kind="adapter",
            name=name,
            version=args.version,
            license=args.license,
            description=args.description,
            no_bench=False,
            with_training_log=False,
        )
        code = cmd_publish(home, publish)
        timings["publish_s"] = time.monotonic() - started
        if code != 0:
            return code
    print(f"done ({_times(timings)})")
    return 0


def _times(timings: dict[str, float]) -> str:
    return ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items())


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 0.5]")
    return value


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register `mirador create`."""
    p = sub.add_parser("create", help="create a personality from a description and example files")
    p.add_argument("description", help='what it is for, e.g. "Legal document analyzer for contracts"')
    p.add_argument("--examples", nargs="+", required=True, help=".txt, .md or .pdf files it learns from")
    p.add_argument("--base", help="the base GGUF (default: the node's model)")
    p.add_argument("--name", help="the personality's (and adapter's) name (default: from the description)")
    p.add_argument("--per-chunk", type=_count, default=2, help="questions asked per chunk (1 with --dp)")
    p.add_argument("--held-out", type=_share, default=0.2, help="share of chunks held out unseen (0 to 0.5)")
    p.add_argument("--steps", type=_count, default=60, help="training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dp", action="store_true", help="differentially private training (unit: one chunk)")
    p.add_argument("--epsilon", type=float, help="with --dp: target ε of this run")
    p.add_argument("--delta", type=float, default=1e-5, help="with --dp: δ (default 1e-5)")
    p.add_argument("--publish", action="store_true", help="sign and publish the adapter (needs --dp or public data)")
    p.add_argument("--public-examples", action="store_true", help="the examples are public: publishing without DP")
    p.add_argument("--version", default="1.0.0", help="with --publish: the version published")
    p.add_argument("--license", default="Apache-2.0", help="with --publish: the license published")
    p.add_argument("--dry-run", action="store_true", help="show the synthesised pairs; train nothing")
    return p
