"""The batching engine in-process: batched, reused and fresh decoding give identical greedy text."""

from node.inference.engine import Job
from node.inference.llama_backend import LlamaModel
from tests.engine_harness import generate

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
