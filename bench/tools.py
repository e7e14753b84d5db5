"""Tools and structured outputs: the speed of generation under a grammar against free generation on the same tokens.

The embedded model answers a prompt greedily under a grammar (a JSON object, a JSON schema); those tokens are then
fed again, one decode each, three times: sampling at every step with the node's grammar sampler (llama.cpp's fast
path: the drawn token checked alone), with the grammar applied to the whole vocabulary first (llama.cpp's plain
grammar sampler in the chain), and with the free greedy chain (the reference: no grammar). Every path decodes the
same tokens, so the ratio is the cost of the grammar alone. Medians of `--reps` runs, alternating.

    python bench/tools.py [--tokens 80] [--reps 5]
"""

import argparse
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


def main() -> None:
    """Measure, print the table, write bench/results/tools.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=positive_int, default=80)
    ap.add_argument("--reps", type=positive_int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tools.json")
    args = ap.parse_args()
    from node.inference.llama_backend import LlamaModel
    from node.inference.models import embedded_model_path
    from node.inference.structured import grammar_for

    path = embedded_model_path()
    model = LlamaModel(path, extra_buffers=extra_buffers(path))
    result: dict[str, Any] = run_header("llama_cpp_python") | {"grammar": {}}
    try:
        for name, grammar in (
            ("json_object", grammar_for("json_object")),
            ("json_schema (person)", grammar_for("json_schema", PERSON)),
        ):
            assert grammar is not None
            result["grammar"][name] = measure(model, grammar, args.tokens, args.reps)
    finally:
        model.close()
    write_json(args.out, result)
    print("generation under a grammar, the same tokens decoded; speed relative to free generation (goal >= 0.8)")
    print(f"{'format':<32} {'path':<28} {'tok/s':>7} {'vs free':>8}")
    for name, m in result["grammar"].items():
        for row in m["rows"]:
            print(
                f"{name + ' (' + str(m['tokens']) + ' tok)':<32} {row['path']:<28} {row['tok_s']:>7} {row['ratio']:>8}"
            )
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
