"""Hot-swapping LoRA adapters over one base: exact logits after re-attach, mixed batches, KV reset, LRU budget."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from node.adapters.cache import AdapterRef
from node.adapters.check import BaseDims, base_dims
from node.inference.engine import InferenceEngine
from node.inference.llama_backend import BatchContext, LlamaModel, LoraAdapter
from tests.engine_harness import generate, settings
from tests.lora_files import strong_adapters

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def dims(llama: LlamaModel) -> BaseDims:
    return base_dims(llama.meta)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, dims: BaseDims) -> dict[str, Path]:
    return strong_adapters(tmp_path_factory.mktemp("adapters"), dims, ["a", "b", "c"])


def ref(files: dict[str, Path], name: str, version: str = "v1", scale: float = 1.0) -> tuple[AdapterRef, ...]:
    return (AdapterRef(f"{name}@{version}", files[name], scale),)


def prompt_logits(ctx: BatchContext, tokens: list[int]) -> np.ndarray:
    ctx.forget(0)
    for i, t in enumerate(tokens):
        ctx.add(t, i, 0, i == len(tokens) - 1)
    ctx.decode()
    return ctx.logits(-1)


@pytest.fixture
def context(llama: LlamaModel) -> Iterator[BatchContext]:
    ctx = BatchContext(llama, n_ctx_seq=128, n_seq=1, n_batch=64, n_threads=2)
    yield ctx
    ctx.close()


def test_reattached_adapter_gives_the_logits_of_a_fresh_load(
    llama: LlamaModel, files: dict[str, Path], context: BatchContext
) -> None:
    # Arrange
    tokens = llama.tokenize(PROMPT, add_special=True, parse_special=False)
    a, b = LoraAdapter(llama, files["a"]), LoraAdapter(llama, files["b"])
    fresh_ctx = BatchContext(llama, n_ctx_seq=128, n_seq=1, n_batch=64, n_threads=2)
    fresh_a = LoraAdapter(llama, files["a"])
    try:
        fresh_ctx.set_adapters([(fresh_a, 1.0)])
        fresh = prompt_logits(fresh_ctx, tokens)
        # Act: attach a, switch to b, detach, re-attach a on the same context
        context.set_adapters([(a, 1.0)])
        first = prompt_logits(context, tokens)
        context.set_adapters([(b, 1.0)])
        other = prompt_logits(context, tokens)
        context.set_adapters([])
        base = prompt_logits(context, tokens)
        context.set_adapters([(a, 1.0)])
        again = prompt_logits(context, tokens)
    finally:
        fresh_ctx.close()
        for adapter in (a, b, fresh_a):
            adapter.close()
    # Assert
    assert np.array_equal(first, fresh) and np.array_equal(again, fresh)
    assert np.abs(fresh - base).mean() > 0.5, "the adapter must change the logits"
    assert np.abs(other - fresh).mean() > 0.5, "a different adapter must give different logits"


def test_mixed_batch_of_personalities_decodes_like_each_alone(llama: LlamaModel, files: dict[str, Path]) -> None:
    # Arrange: each (adapter set, prompt) alone on a fresh one-slot engine
    prompts = [PROMPT, PROMPT, PROMPT, "Once upon a time, a small robot"]
    adapters = [ref(files, "a"), (), ref(files, "b"), ref(files, "a", scale=0.5)]
    alone = [generate(llama, 1, [p], adapters=[ad])[0] for p, ad in zip(prompts, adapters, strict=True)]
    # Act: all four at once on a four-slot engine (three adapter groups per step)
    together = generate(llama, 4, prompts, adapters=adapters)
    # Assert
    assert together == alone
    assert len(set(alone[:3])) == 3, "base, a and b must answer the same prompt differently"


def test_a_swap_drops_the_sequences_kv_cache(llama: LlamaModel, files: dict[str, Path]) -> None:
    # Arrange
    fresh = generate(llama, 1, [PROMPT], adapters=[ref(files, "a")])[0]
    jobs: list = []
    # Act: the same prompt on the same slot, first with the base, then with adapter a
    texts = generate(
        llama,
        1,
        [PROMPT, PROMPT, PROMPT],
        sequential=True,
        adapters=[(), ref(files, "a"), ref(files, "a")],
        jobs_out=jobs,
    )
    # Assert: the base's KV cache is not reused for a; a's own cache is reused by the next a request (all but the
    # last two tokens: a prompt's last token is never decoded alone)
    assert texts[1] == fresh == texts[2]
    assert [j.stats.reused_tokens for j in jobs] == [0, 0, len(llama.tokenize(PROMPT, True, False)) - 2]


def test_lru_evicts_under_the_budget_and_reloads_on_demand(llama: LlamaModel, files: dict[str, Path]) -> None:
    # Arrange: a 4 MB budget holds two of the 1.85 MB adapters
    engine = InferenceEngine(llama, settings(1, adapter_cache_mb=4))
    order = ["a", "b", "c", "a"]
    stats: dict = {}
    # Act
    texts = generate(
        llama, 1, [PROMPT] * 4, sequential=True, adapters=[ref(files, n) for n in order], engine=engine, stats_out=stats
    )
    # Assert: a was evicted when c came, then loaded again; it answers as before
    assert stats["loads"] == 4 and stats["evictions"] == 2 and stats["hits"] == 0
    assert [e["key"] for e in stats["loaded"]] == ["c@v1", "a@v1"]
    assert stats["used_bytes"] <= stats["budget_bytes"]
    assert texts[3] == texts[0]


def test_a_new_version_replaces_the_old_one_in_the_cache(llama: LlamaModel, files: dict[str, Path]) -> None:
    # Arrange
    engine = InferenceEngine(llama, settings(1, adapter_cache_mb=64))
    v1 = (AdapterRef("x@v1", files["a"]),)
    v2 = (AdapterRef("x@v2", files["b"]),)
    stats: dict = {}
    # Act
    texts = generate(llama, 1, [PROMPT] * 2, sequential=True, adapters=[v1, v2], engine=engine, stats_out=stats)
    # Assert
    assert [e["key"] for e in stats["loaded"]] == ["x@v2"]
    assert texts[1] == generate(llama, 1, [PROMPT], adapters=[ref(files, "b")])[0]


def test_an_adapter_that_fails_to_load_fails_only_its_request(
    llama: LlamaModel, files: dict[str, Path], tmp_path: Path
) -> None:
    # Arrange: a damaged file (cut in half) behind a version key
    damaged = tmp_path / "cut.gguf"
    damaged.write_bytes(files["a"].read_bytes()[: files["a"].stat().st_size // 2])
    engine = InferenceEngine(llama, settings(1))
    jobs: list = []
    # Act
    texts = generate(
        llama,
        1,
        [PROMPT, PROMPT],
        sequential=True,
        adapters=[(AdapterRef("cut@v1", damaged),), ()],
        engine=engine,
        jobs_out=jobs,
    )
    # Assert
    assert jobs[0].error_code == "adapter_unavailable" and "truncated" in (jobs[0].error or "")
    assert texts[0] == "" and jobs[1].error is None and len(texts[1]) > 0
    assert engine.adapters.stats()["loads"] == 0
