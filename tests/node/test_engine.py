"""The batching engine in-process: batched, reused and fresh decoding give identical greedy text."""

import trio

from node.engine import GenerationRequest, InferenceEngine
from node.llama_backend import LlamaModel, SamplingParams
from node.profiles import InferenceSettings

PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):", "Water boils at"]


def settings(slots: int) -> InferenceSettings:
    return InferenceSettings(
        profile="test", threads=2, n_ctx=512, max_tokens=64, batch_size=64, slots=slots, adapter_cache_mb=1
    )


def generate(
    llama: LlamaModel, slots: int, prompts: list[str], max_tokens: int = 24, sequential: bool = False
) -> list[str]:
    """Greedy completions of `prompts` on a fresh engine, submitted together (or one after another)."""

    async def main() -> list[str]:
        engine = InferenceEngine(llama, settings(slots))
        out: dict[int, str] = {}

        async def one(i: int, text: str) -> None:
            tokens = llama.tokenize(text, add_special=True, parse_special=False)
            req = GenerationRequest(
                prompt_tokens=tokens,
                sampling=SamplingParams(temperature=0),
                max_tokens=max_tokens,
                stream=True,
                ignore_eos=True,
            )
            job = await engine.submit(req, 60)
            out[i] = "".join([d async for d in job.text()])
            assert job.stats.completion_tokens == max_tokens

        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            if sequential:
                for i, p in enumerate(prompts):
                    await one(i, p)
            else:
                async with trio.open_nursery() as jobs:
                    for i, p in enumerate(prompts):
                        jobs.start_soon(one, i, p)
            nursery.cancel_scope.cancel()
        return [out[i] for i in range(len(prompts))]

    return trio.run(main)


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


def test_queue_longer_than_slots_completes_every_job(llama: LlamaModel) -> None:
    texts = generate(llama, 2, PROMPTS * 2, max_tokens=8)
    assert texts[:4] == texts[4:]
