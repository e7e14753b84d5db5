"""The batching engine in-process: batched, reused and fresh decoding give identical greedy text (and logits)."""

from pathlib import Path

import numpy as np

from node.adapters.check import base_dims_of_file
from node.inference.engine import Job
from node.inference.llama_backend import BatchContext, LlamaModel, LoraAdapter
from node.inference.models import embedded_model_path
from tests.engine_harness import generate
from tests.lora_files import strong_adapters

PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):", "Water boils at"]


def test_batched_sequences_decode_like_single_ones(llama: LlamaModel) -> None:
    # Arrange: each prompt alone on a one-slot engine
    alone = [generate(llama, 1, [p])[0] for p in PROMPTS]
    # Act: all four decoded together in one batch context
    together = generate(llama, 4, PROMPTS)
    # Assert
    assert together == alone
    assert len(set(alone)) == len(alone)  # the prompts really lead to different text


def test_kv_prefix_reuse_gives_the_same_text_as_a_fresh_context(llama: LlamaModel) -> None:
    # Arrange: the second prompt extends the first, so its prefix is reused from the slot's KV cache
    first, second = PROMPTS[1], PROMPTS[1] + " named Pip"
    fresh = generate(llama, 1, [second])[0]
    # Act
    reused = generate(llama, 1, [first, second], sequential=True)[1]
    # Assert
    assert reused == fresh


def test_a_continued_prompt_finds_its_cached_prefix_after_an_unrelated_one(llama: LlamaModel) -> None:
    # Arrange: two slots; A, then an unrelated B, then A continued
    first, other = PROMPTS[1], PROMPTS[2]
    jobs: list[Job] = []
    # Act
    generate(llama, 2, [first, other, first + " named Pip"], sequential=True, jobs_out=jobs)
    # Assert: B took the idle sequence, so A's KV cache was still there for its continuation
    prefix = len(llama.tokenize(first, add_special=True, parse_special=False))
    assert jobs[1].stats.reused_tokens <= 1
    assert jobs[2].stats.reused_tokens >= prefix - 1


def test_queue_longer_than_slots_completes_every_job(llama: LlamaModel) -> None:
    texts = generate(llama, 2, PROMPTS * 2, max_tokens=8)
    assert texts[:4] == texts[4:]


def test_logits_do_not_depend_on_how_a_prompt_is_chunked_or_what_shares_its_batch(
    llama: LlamaModel, tmp_path: Path
) -> None:
    # Arrange: a prompt evaluated whole, and in other chunks, alone or beside another sequence, with an adapter
    # attached; every decode of two rows or more (one row alone is computed otherwise: node.inference.engine)
    adapter = LoraAdapter(llama, strong_adapters(tmp_path, base_dims_of_file(embedded_model_path()), ["a"])["a"])
    tokens = llama.tokenize(" ".join(PROMPTS * 3), add_special=True, parse_special=False)

    def last_logits(cuts: list[int], neighbour: bool) -> np.ndarray:
        ctx = BatchContext(llama, 256, 2, 128, 2)
        try:
            ctx.set_adapters([(adapter, 1.0)])
            start, other = 0, 0
            for cut in [*cuts, len(tokens)]:
                for i in range(start, cut):
                    index = ctx.add(tokens[i], i, 0, i == len(tokens) - 1)
                for _ in range(3 if neighbour else 0):
                    ctx.add(tokens[other], other, 1, False)
                    other += 1
                ctx.decode()
                start = cut
            return ctx.logits(index)
        finally:
            ctx.close()

    # Act
    whole = last_logits([], neighbour=False)
    variants = [last_logits(cuts, n) for cuts in ([10], [len(tokens) - 2], [7, 20, 33]) for n in (False, True)]
    # Assert: bit-identical (llama.cpp's CPU flash attention made them differ by up to 0.6)
    assert all(np.array_equal(v, whole) for v in variants)
