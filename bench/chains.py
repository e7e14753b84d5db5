"""Chains: a 3-step chain over two adapters with 200-token intermediate answers, run with the streaming hand-off
(node.chains.handoff) and strictly one step after the other, alternating, on a fresh in-process engine each run.

Measured per run: end-to-end time, and each later step's time to first token after the previous step's last token
(the hand-off's point: the next prompt is already evaluated). Ratios are hand-off / sequential medians of the same
run; the texts of both paths must be identical. Prints a table and writes bench/results/chains.json.

    .venv/bin/python bench/chains.py [--threads 2] [--reps 5] [--tokens 200] [--final-tokens 32]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from bench.common import extra_buffers, positive_int, run_header, write_json
from bench.personalities import write_adapters
from marketplace.chain import parse_chain
from node.adapters.cache import AdapterRef
from node.chains.handoff import CHUNK_CHARS, ChainSteps
from node.chains.resolve import RunnableChain, RunnableStep
from node.chains.run import ChainStep, run_chain
from node.core.profiles import InferenceSettings
from node.inference.engine import GenerationRequest, InferenceEngine, Job, Warmup
from node.inference.llama_backend import SamplingParams
from node.inference.models import BaseModel, embedded_model_path
from node.inference.steps import StepDone, Text

CHAIN = """
name: bench
version: 1.0.0
steps:
  - personality: writer
    prompt: "Write a long story about {input}."
  - personality: editor
    prompt: "Rewrite this story for a child: {previous}"
  - personality: writer
    prompt: "Summarise this story in one sentence: {previous}"
"""


def chain_of(folder: Path) -> RunnableChain:
    """The bench chain with two realistic random q,v adapters (bench/personalities.py's)."""
    paths = write_adapters(folder, 2, "qv")
    refs = {"writer": (AdapterRef("writer@v1", paths[0]),), "editor": (AdapterRef("editor@v1", paths[1]),)}
    parsed = parse_chain(CHAIN, "bench.yaml")
    return RunnableChain(
        parsed, tuple(RunnableStep(s, str(s.personality), refs[str(s.personality)]) for s in parsed.steps)
    )


def run_once(
    model: BaseModel, chain: RunnableChain, handoff: bool, chunk_chars: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One chain run on a fresh engine: timings, reused tokens and the texts."""
    settings = InferenceSettings(
        profile="bench", threads=args.threads, n_ctx=2048, max_tokens=1024, batch_size=256, slots=2, adapter_cache_mb=64
    )

    async def main() -> dict[str, Any]:
        engine = InferenceEngine(model.llama, settings)
        started = 0

        async def start(tokens: list[int], adapters: tuple[AdapterRef, ...], warm: Warmup | None) -> Job:
            nonlocal started
            started += 1
            limit = args.final_tokens if started == len(chain.steps) else args.tokens
            request = GenerationRequest(
                tokens, SamplingParams(temperature=0), limit, ignore_eos=True, adapters=adapters
            )
            return await (warm.start(request) if warm is not None else engine.submit(request, 60))

        steps = ChainSteps(model, engine, start, trio.CapacityLimiter(1), handoff, chunk_chars or CHUNK_CHARS)
        texts: list[str] = []
        final = ""
        first = 0.0  # when the final step's first text arrived
        ended: list[float] = []  # when each step's StepDone arrived (its last token delivered)
        prompt_s: list[float] = []  # each step's admission to first token (the worker's clock)
        reused: list[int] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            t0 = time.perf_counter()
            async for ev in run_chain(chain, "a lighthouse keeper", steps):
                now = time.perf_counter()
                if isinstance(ev, Text):
                    first = first or now
                    final += ev.text
                elif isinstance(ev, StepDone):
                    ended.append(now)
                    reused.append(ev.job.stats.reused_tokens)
                    prompt_s.append(ev.job.stats.prompt_s)
                elif isinstance(ev, ChainStep):
                    texts.append(ev.text)
            total = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        return {
            "e2e_s": total,
            "final_ttft_s": first - ended[-2],
            "step2_prompt_s": prompt_s[1],
            "reused": reused,
            "texts": [*texts, final],
        }

    return trio.run(main)


def row_costs(model: BaseModel, threads: int, reps: int = 30) -> dict[str, float]:
    """What a prompt token costs where: ms per decode of one row (a generating token alone), of one row plus 12
    (a generating token with a warm-up chunk riding along), of 12 rows alone (a warm-up chunk's own decode), and
    per row of a 230-row prefill. Whether riding along could save time at all depends on these."""
    from node.inference.llama_backend import BatchContext

    tokens = model.llama.tokenize("The lighthouse keeper kept the light burning. " * 40, True, False)
    ctx = BatchContext(model.llama, 1024, 2, 256, threads)

    def timed(rows: list[tuple[int, int]]) -> float:  # (sequence, count) per decode; ms per decode
        spent = 0.0
        for _ in range(reps):
            for seq, count in rows:
                for i in range(count):
                    ctx.add(tokens[i], i, seq, False)
            began = time.perf_counter()
            ctx.decode()
            spent += time.perf_counter() - began
            ctx.forget(0)
            ctx.forget(1)
        return spent / reps * 1000

    try:
        out = {
            "one_row_ms": timed([(0, 1)]),
            "one_plus_12_rows_ms": timed([(0, 1), (1, 12)]),
            "twelve_rows_ms": timed([(1, 12)]),
            "prefill_230_per_row_ms": timed([(0, 230)]) / 230,
        }
    finally:
        ctx.close()
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    """Run, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--reps", type=positive_int, default=5)
    parser.add_argument("--tokens", type=positive_int, default=200, help="tokens of each intermediate answer")
    parser.add_argument("--final-tokens", type=positive_int, default=32)
    parser.add_argument("--chunks", default="48,96,192", help="hand-off chunk sizes (characters)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chains.json")
    parser.add_argument("--row-costs", action="store_true", help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.row_costs:
        path = embedded_model_path()
        model = BaseModel("bench", path, extra_buffers=extra_buffers(path))
        print(json.dumps(row_costs(model, args.threads)))
        return
    sizes = [positive_int(c) for c in args.chunks.split(",")]
    path = embedded_model_path()
    model = BaseModel("bench", path, extra_buffers=extra_buffers(path))
    modes = {"sequential": 0, **{f"handoff/{c}": c for c in sizes}}
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    # in a child: decoding here from a second thread would give this process a second OpenMP team, which slows
    # every later decode (docs/BENCHMARKS.md, "Decoding from several threads is slow")
    child = [sys.executable, __file__, "--row-costs", "--threads", str(args.threads)]
    costs = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        chain = chain_of(Path(tmp))
        run_once(model, chain, True, CHUNK_CHARS, args)  # warm the page cache and the adapters' files
        for rep in range(args.reps):
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))
            for mode in order:
                runs[mode].append(run_once(model, chain, modes[mode] > 0, modes[mode], args))
                print(f"rep {rep + 1}/{args.reps} {mode}: {runs[mode][-1]['e2e_s']:.2f} s", file=sys.stderr)
    model.close()

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    reference = runs["sequential"][0]["texts"]
    same = all(r["texts"] == reference for mode in runs for r in runs[mode])
    rows = []
    for mode in modes:
        row: dict[str, Any] = {"mode": mode}
        for key in ("e2e_s", "final_ttft_s", "step2_prompt_s"):
            row[key] = round(median(mode, key), 4)
            row[key.removesuffix("_s") + "_ratio"] = round(median(mode, key) / median("sequential", key), 3)
        row["reused_tokens"] = runs[mode][0]["reused"]
        rows.append(row)
    result: dict[str, Any] = run_header("llama_cpp_python", "trio") | {
        "threads": args.threads,
        "reps": args.reps,
        "intermediate_tokens": args.tokens,
        "final_tokens": args.final_tokens,
        "same_text": same,
        "rows": rows,
        "row_costs": costs,
        "goals": {"final_ttft_ratio_max": 0.2, "e2e_ratio_max": 0.85},
    }
    write_json(args.out, result)
    print(
        f"{'mode':<14} {'e2e s':>8} {'ratio':>6} {'final TTFT s':>13} {'ratio':>6} {'step 2 prompt s':>16} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['mode']:<14} {r['e2e_s']:>8.3f} {r['e2e_ratio']:>6.3f} {r['final_ttft_s']:>13.4f} "
            f"{r['final_ttft_ratio']:>6.3f} {r['step2_prompt_s']:>16.4f} {r['step2_prompt_ratio']:>6.3f}"
        )
    print(f"same text in every mode: {same}; row costs (ms): {costs}")


if __name__ == "__main__":
    main()
