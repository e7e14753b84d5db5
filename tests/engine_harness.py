"""Run greedy generations through a real in-process InferenceEngine (llama.cpp, no HTTP)."""

from collections.abc import Sequence
from typing import Any

import trio

from node.adapters.cache import AdapterRef
from node.core.profiles import InferenceSettings
from node.inference.engine import GenerationRequest, InferenceEngine, Job
from node.inference.llama_backend import LlamaModel, SamplingParams


def settings(slots: int, adapter_cache_mb: int = 1) -> InferenceSettings:
    """Small test settings: 2 threads, 512-token sequences."""
    return InferenceSettings(
        profile="test",
        threads=2,
        n_ctx=512,
        max_tokens=64,
        batch_size=64,
        slots=slots,
        adapter_cache_mb=adapter_cache_mb,
    )


def generate(
    llama: LlamaModel,
    slots: int,
    prompts: Sequence[str],
    max_tokens: int = 24,
    sequential: bool = False,
    adapters: Sequence[tuple[AdapterRef, ...]] | None = None,
    engine: InferenceEngine | None = None,
    jobs_out: list[Job] | None = None,
    stats_out: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy completions of `prompts` (each with its adapters), submitted together or one after another.

    A fresh engine is made unless `engine` is given; finished jobs are appended to `jobs_out` in prompt order;
    `stats_out` receives the adapter cache's statistics before the engine stops (which unloads every adapter).
    """
    refs = list(adapters) if adapters is not None else [()] * len(prompts)

    async def main() -> list[str]:
        eng = engine or InferenceEngine(llama, settings(slots))
        out: dict[int, str] = {}
        done: dict[int, Job] = {}

        async def one(i: int, text: str) -> None:
            tokens = llama.tokenize(text, add_special=True, parse_special=False)
            req = GenerationRequest(
                prompt_tokens=tokens,
                sampling=SamplingParams(temperature=0),
                max_tokens=max_tokens,
                stream=True,
                ignore_eos=True,
                adapters=refs[i],
            )
            job = await eng.submit(req, 60)
            out[i] = "".join([d async for d in job.text()])
            await job.done.wait()
            done[i] = job

        async with trio.open_nursery() as nursery:
            await nursery.start(eng.run)
            if sequential:
                for i, p in enumerate(prompts):
                    await one(i, p)
            else:
                async with trio.open_nursery() as jobs:
                    for i, p in enumerate(prompts):
                        jobs.start_soon(one, i, p)
            if stats_out is not None:
                stats_out.update(eng.adapters.stats())
            nursery.cancel_scope.cancel()
        if jobs_out is not None:
            jobs_out.extend(done[i] for i in range(len(prompts)))
        return [out[i] for i in range(len(prompts))]

    return trio.run(main)
