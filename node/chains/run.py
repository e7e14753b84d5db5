"""Running a chain's steps in order: each step's prompt (`{input}`, `{previous}`) as a user message to its
personality or adapter; every step but the last is collected and reported (ChainStep), the last one streams.

The steps run one after the other here; the streaming hand-off (the next step's prompt evaluated while the previous
one generates) is the engine's part and comes next."""

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from marketplace.chain import render
from node.adapters.cache import AdapterRef
from node.chains.resolve import RunnableChain
from node.inference.engine import Job
from node.inference.steps import StepDone, Text

Generate = Callable[[str, tuple[AdapterRef, ...]], Awaitable[Job]]  # (user message, adapters) -> a started job


@dataclass(frozen=True)
class ChainStep:
    """A finished intermediate step: who answered, with which adapters, its text, tokens and time."""

    STREAM_KEY: ClassVar[str] = "chain_step"
    LIST_KEY: ClassVar[str] = "steps"
    index: int
    by: str
    adapters: tuple[str, ...]
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str

    def as_dict(self) -> dict[str, Any]:
        """The step as the API shows it."""
        return {
            "index": self.index,
            "by": self.by,
            "adapters": list(self.adapters),
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "finish_reason": self.finish_reason,
        }


ChainEvent = ChainStep | Text | StepDone


async def run_chain(chain: RunnableChain, chain_input: str, generate: Generate) -> AsyncGenerator[ChainEvent, None]:
    """Run the steps in order; the last one's text streams as Text."""
    previous: str | None = None
    last = len(chain.steps) - 1
    for i, step in enumerate(chain.steps):
        started = time.monotonic()
        job = await generate(render(step.step, chain_input, previous), step.adapters)
        parts: list[str] = []
        try:
            async for delta in job.text():
                parts.append(delta)
                if i == last:
                    yield Text(delta)
        finally:
            job.cancel()
        if i == last or job.error or job.cut_by_shutdown:
            yield StepDone(job, final=True)
            return
        previous = "".join(parts).strip()
        yield StepDone(job, final=False)
        stats = job.stats
        keys = tuple(a.key for a in step.adapters)
        yield ChainStep(
            i + 1,
            step.label,
            keys,
            previous,
            stats.prompt_tokens,
            stats.completion_tokens,
            time.monotonic() - started,
            stats.finish_reason,
        )
