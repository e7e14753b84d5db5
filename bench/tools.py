"""Tools and structured outputs: the speed of generation under a grammar against free generation on the same tokens,
and the round trip of the sandbox for untrusted code.

Grammar: the embedded model answers a prompt greedily under a grammar (a JSON object, a JSON schema); those tokens are
then fed again, one decode each, three times: sampling at every step with the node's grammar sampler (llama.cpp's
fast path: the drawn token checked alone), with the grammar applied to the whole vocabulary first (llama.cpp's plain
grammar sampler in the chain), and with the free greedy chain (the reference: no grammar). Every path decodes the
same tokens, so the ratio is the cost of the grammar alone. Medians of `--reps` runs, alternating.

Sandbox: `Sandbox.run_python("print(1)")` (bwrap, the bootstrap's limits, the interpreter with its site-packages)
against the same interpreter started bare (`python -I -c "print(1)"` through trio.run_process, no sandbox), each
`--sandbox-runs` times, alternating after one warm-up of each; p50 and p99 of the wall time, and their ratio.

Agents: an `every:1s` agent (the real AgentService on the real clock) records how late each run's `analyze` starts
after its scheduled second (the schedule task, the worker thread, the agent's asyncio loop), against a bare trio task
sleeping until the same seconds in the same loop (the reference); `--fires` of each, p50 and p99.

    python bench/tools.py [--only grammar|sandbox|agents] [--tokens 80] [--reps 5] [--sandbox-runs 30] [--fires 20]

With `--only`, the sections not measured are kept from the previous results file.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import extra_buffers, positive_int, run_header, write_json

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "<|im_start|>user\nDescribe a cat as JSON.<|im_end|>\n<|im_start|>assistant\n"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "hobbies"],
}


def run(model: Any, tokens: list[int], prompt: list[int], pick: Callable[[Any], int]) -> float:
    """Seconds to decode `tokens` after `prompt`, calling `pick` (a sampler) before each one."""
    from node.inference.llama_backend import BatchContext

    ctx = BatchContext(model, 1024, 1, 256, 2)
    try:
        for i, t in enumerate(prompt):
            ctx.add(t, i, 0, i == len(prompt) - 1)
        ctx.decode()
        started = time.perf_counter()
        for i, t in enumerate(tokens):
            pick(ctx)
            ctx.add(t, len(prompt) + i, 0, True)
            ctx.decode()
        return time.perf_counter() - started
    finally:
        ctx.close()


def measure(model: Any, grammar: str, limit: int, reps: int) -> dict[str, Any]:
    """The three paths over the tokens the grammar yields."""
    import llama_cpp as ll

    from node.inference.llama_backend import SamplingParams, make_sampler

    prompt = model.tokenize(PROMPT, True, True)
    first = make_sampler(SamplingParams(temperature=0, grammar=grammar), model.n_vocab, model.vocab)
    tokens: list[int] = []
    run(model, [0] * limit, prompt, lambda ctx: tokens.append(first.sample(ctx.ctx, -1)))  # what the grammar draws
    first.free()
    tokens = tokens[: next((i for i, t in enumerate(tokens) if model.is_eog(t)), len(tokens))]

    def fast() -> float:
        s = make_sampler(SamplingParams(temperature=0, grammar=grammar), model.n_vocab, model.vocab)
        try:
            return run(model, tokens, prompt, lambda ctx: s.sample(ctx.ctx, -1))
        finally:
            s.free()

    def whole_vocabulary() -> float:
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root"))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        try:
            return run(model, tokens, prompt, lambda ctx: ll.llama_sampler_sample(chain, ctx.ctx, -1))
        finally:
            ll.llama_sampler_free(chain)

    def free() -> float:
        s = make_sampler(SamplingParams(temperature=0), model.n_vocab)
        try:
            return run(model, tokens, prompt, lambda ctx: s.sample(ctx.ctx, -1))
        finally:
            s.free()

    times: dict[str, list[float]] = {"free (reference)": [], "grammar, fast path": [], "grammar, whole vocabulary": []}
    for _ in range(reps):
        times["free (reference)"].append(free())
        times["grammar, fast path"].append(fast())
        times["grammar, whole vocabulary"].append(whole_vocabulary())
    ref = statistics.median(times["free (reference)"])
    return {
        "tokens": len(tokens),
        "rows": [
            {
                "path": k,
                "tok_s": round(len(tokens) / statistics.median(v), 1),
                "ratio": round(ref / statistics.median(v), 3),
            }
            for k, v in times.items()
        ],
    }


def measure_grammar(tokens: int, reps: int) -> dict[str, Any]:
    """Both formats on the embedded model."""
    from node.inference.llama_backend import LlamaModel
    from node.inference.models import embedded_model_path
    from node.inference.structured import grammar_for

    path = embedded_model_path()
    model = LlamaModel(path, extra_buffers=extra_buffers(path))
    result: dict[str, Any] = {}
    try:
        for name, grammar in (
            ("json_object", grammar_for("json_object")),
            ("json_schema (person)", grammar_for("json_schema", PERSON)),
        ):
            assert grammar is not None
            result[name] = measure(model, grammar, tokens, reps)
    finally:
        model.close()
    return result


SECTIONS = ("grammar", "sandbox", "agents")


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (linear between the measured values, never past the largest)."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def measure_sandbox(runs: int) -> dict[str, Any]:
    """The sandbox round trip and the bare interpreter's, alternating; milliseconds."""
    import subprocess

    import trio

    from node.tools.sandbox import Sandbox

    sandbox = Sandbox()
    sandbox.check()

    async def bare() -> float:
        started = time.perf_counter()
        done = await trio.run_process([sys.executable, "-I", "-c", "print(1)"], capture_stdout=True)
        elapsed = time.perf_counter() - started
        assert done.stdout == b"1\n", done
        return elapsed

    async def sandboxed() -> float:
        started = time.perf_counter()
        outcome = await sandbox.run_python("print(1)")
        elapsed = time.perf_counter() - started
        assert outcome.ok() and outcome.stdout == "1\n", outcome
        return elapsed

    async def both() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {"bare interpreter (reference)": [], "sandbox": []}
        await bare()
        await sandboxed()
        for _ in range(runs):
            times["bare interpreter (reference)"].append(await bare())
            times["sandbox"].append(await sandboxed())
        return times

    times = trio.run(both)
    bwrap = subprocess.run([sandbox.bwrap, "--version"], capture_output=True, text=True).stdout.strip()
    ref = statistics.median(times["bare interpreter (reference)"])
    return {
        "runs": runs,
        "bwrap": bwrap,
        "as_root": os.geteuid() == 0,
        "rows": [
            {
                "path": k,
                "p50_ms": round(statistics.median(v) * 1000, 1),
                "p99_ms": round(percentile(v, 99) * 1000, 1),
                "vs_bare": round(statistics.median(v) / ref, 2),
            }
            for k, v in times.items()
        ],
    }


AGENT = """
import time
import mirador

LATE = []


@mirador.agent
class Tick:
    triggers = ["every:1s"]

    async def analyze(self, context):
        LATE.append(time.time() - context.event.data["scheduled"])
"""


def measure_agents(fires: int) -> dict[str, Any]:
    """Schedule lateness of an agent's runs and of a bare trio sleep to the same seconds; milliseconds."""
    import tempfile

    import trio

    from node.agents.alerts import AlertStore
    from node.agents.events import EventBus
    from node.agents.service import AgentService, Runtime
    from node.core.config import AgentsSection

    bare_late: list[float] = []
    agent_late: list[float] = []

    async def unused(*args: Any) -> Any:
        raise AssertionError("the bench agent uses nothing")

    async def bench(folder: Path) -> None:
        (folder / "agents").mkdir()
        (folder / "agents" / "tick.py").write_text(AGENT)
        bus = EventBus()
        bus.bind()
        alerts = AlertStore(folder / "state.db")
        service = AgentService(folder / "agents", AgentsSection(), alerts, bus, Runtime(unused, unused, unused))
        late = sys.modules["mirador_user.agents.tick"].LATE

        async def bare() -> None:
            while len(bare_late) < fires:
                target = float(int(time.time()) + 1)
                await trio.sleep(target - time.time())
                bare_late.append(time.time() - target)

        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            nursery.start_soon(bare)
            while len(late) < fires or len(bare_late) < fires:
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        alerts.close()
        agent_late.extend(late[:fires])

    with tempfile.TemporaryDirectory() as tmp:
        trio.run(bench, Path(tmp))
    rows = []
    for path, values in (("bare trio sleep (reference)", bare_late), ("agent every:1s", agent_late)):
        rows.append(
            {
                "path": path,
                "p50_ms": round(statistics.median(values) * 1000, 2),
                "p99_ms": round(percentile(values, 99) * 1000, 2),
            }
        )
    return {"fires": fires, "rows": rows}


def main() -> None:
    """Measure, print the tables, write bench/results/tools.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=SECTIONS, help="measure one section (the others are kept)")
    ap.add_argument("--tokens", type=positive_int, default=80)
    ap.add_argument("--reps", type=positive_int, default=5)
    ap.add_argument("--sandbox-runs", type=positive_int, default=30)
    ap.add_argument("--fires", type=positive_int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tools.json")
    args = ap.parse_args()
    previous: dict[str, Any] = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    result: dict[str, Any] = run_header("llama_cpp_python", "trio")
    for section in SECTIONS:
        if args.only not in (None, section):
            if section in previous:
                result[section] = previous[section] | {"kept_from": previous.get("date")}
        elif section == "grammar":
            result["grammar"] = measure_grammar(args.tokens, args.reps)
        elif section == "sandbox":
            result["sandbox"] = measure_sandbox(args.sandbox_runs)
        else:
            result["agents"] = measure_agents(args.fires)
    write_json(args.out, result)
    if "grammar" in result and args.only in (None, "grammar"):
        print("generation under a grammar, the same tokens decoded; speed relative to free generation (goal >= 0.8)")
        print(f"{'format':<32} {'path':<28} {'tok/s':>7} {'vs free':>8}")
        for name, m in result["grammar"].items():
            for row in m["rows"]:
                label = f"{name} ({m['tokens']} tok)"
                print(f"{label:<32} {row['path']:<28} {row['tok_s']:>7} {row['ratio']:>8}")
    if "sandbox" in result and args.only in (None, "sandbox"):
        box = result["sandbox"]
        if args.only is None:
            print()
        print(f"sandbox round trip, print(1), {box['runs']} runs each, {box['bwrap']} (goal: sandbox p50 <= 100 ms)")
        print(f"{'path':<30} {'p50 ms':>8} {'p99 ms':>8} {'vs bare':>8}")
        for row in box["rows"]:
            print(f"{row['path']:<30} {row['p50_ms']:>8} {row['p99_ms']:>8} {row['vs_bare']:>8}")
    if "agents" in result and args.only in (None, "agents"):
        print(f"\nagent schedule jitter: lateness after the scheduled second, {result['agents']['fires']} fires each")
        print(f"{'path':<30} {'p50 ms':>8} {'p99 ms':>8}")
        for row in result["agents"]["rows"]:
            print(f"{row['path']:<30} {row['p50_ms']:>8} {row['p99_ms']:>8}")
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
