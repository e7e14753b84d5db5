"""Benchmark figures measured at publish time and carried in the manifest (`benchmarks`)."""

import json
import time
from collections.abc import Callable
from pathlib import Path

from node.inference.llama_backend import (
    BatchContext,
    LlamaModel,
    LoraAdapter,
    SamplingParams,
    free_sampler,
    make_sampler,
)

PROMPT = "Write a short paragraph about the sea."


def generation_tok_s(
    model_path: Path, extra_buffers: bool, adapter: Path | None = None, tokens: int = 32, threads: int = 2
) -> float:
    """Greedy generation speed (tokens/s) of a GGUF model, with an optional LoRA adapter attached."""
    model = LlamaModel(model_path, extra_buffers=extra_buffers)
    ctx = BatchContext(model, 256, 1, 64, threads)
    lora = LoraAdapter(model, adapter) if adapter else None
    sampler = make_sampler(SamplingParams(temperature=0), model.n_vocab)
    try:
        if lora:
            ctx.set_adapters([(lora, 1.0)])
        prompt = model.tokenize(PROMPT, True, False)
        for i, t in enumerate(prompt):
            ctx.add(t, i, 0, i == len(prompt) - 1)
        ctx.decode()
        pos = len(prompt)
        started = time.perf_counter()
        for _ in range(tokens):
            tok = ctx.sample(sampler, -1)
            ctx.add(tok, pos, 0, True)
            ctx.decode()
            pos += 1
        return tokens / (time.perf_counter() - started)
    finally:
        free_sampler(sampler)
        ctx.close()
        if lora:
            lora.close()
        model.close()


def publish_benchmarks(
    path: Path, kind: str, base_model: Path, extra_buffers: Callable[[Path], bool], with_training_log: bool = False
) -> dict[str, float]:
    """Figures for the manifest: generation tok/s (of the model, or of the base with the adapter) and, for a
    trained adapter, its ε and δ from training.json, and its held-out loss only `with_training_log` (a loss on the
    user's own data is not covered by the ledger). `extra_buffers` is the node's choice for a GGUF."""
    folder = path if path.is_dir() else path.parent
    ggufs = [path] if path.suffix == ".gguf" else sorted(folder.glob("*.gguf"))
    figures: dict[str, float] = {}
    if len(ggufs) == 1:
        if kind == "adapter":
            speed = generation_tok_s(base_model, extra_buffers(base_model), ggufs[0])
        else:
            speed = generation_tok_s(ggufs[0], extra_buffers(ggufs[0]))
        figures["generation_tok_s"] = round(speed, 1)
    training = folder / "training.json"
    if kind == "adapter" and training.is_file():
        facts = json.loads(training.read_text())
        shared = (("epsilon", "epsilon"), ("delta", "delta"))
        for key, name in (("heldout_loss_after", "heldout_loss"), *shared) if with_training_log else shared:
            if isinstance(facts.get(key), int | float):
                figures[name] = float(facts[key])
    return figures
