"""Running a chain's steps in order: each step's prompt (`{input}`, `{previous}`) as a user message to its
personality or adapter; every step but the last is collected and reported (ChainStep), the last one streams. While
a step generates, the next one's prompt is already being evaluated (node.chains.handoff)."""

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, ClassVar

from marketplace.chain import render
from node.chains.handoff import ChainSteps, Handoff
from node.chains.resolve import RunnableChain
from node.inference.steps import StepDone, Text


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
    reused_tokens: int  # of its prompt, already evaluated when it started (by the hand-off, or a cached prefix)
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
            "reused_tokens": self.reused_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "finish_reason": self.finish_reason,
        }


ChainEvent = ChainStep | Text | StepDone


async def run_chain(chain: RunnableChain, chain_input: str, steps: ChainSteps) -> AsyncGenerator[ChainEvent, None]:
    """Run the steps in order, each next one prepared while the current one streams; the last one's text streams
    as Text."""
    previous: str | None = None
    last = len(chain.steps) - 1
    handoff: Handoff | None = None
    try:
        for i, step in enumerate(chain.steps):
            started = time.monotonic()
            job = await steps.start(render(step.step, chain_input, previous), step.adapters, handoff)
            handoff = None  # its warm-up is the job's sequence now
            try:
                if i < last:
                    handoff = await steps.prepare(chain.steps[i + 1], chain_input)
                text = ""
                async for delta in job.text():
                    text += delta
                    if i == last:
                        yield Text(delta)
                    elif handoff is not None:
                        await handoff.feed(text)
            finally:
                job.cancel()
            if i == last or job.error or job.cut_by_shutdown:
                yield StepDone(job, final=True)
                return
            previous = text.strip()
            yield StepDone(job, final=False)
            stats = job.stats
            keys = tuple(a.key for a in step.adapters)
            yield ChainStep(
                i + 1,
                step.label,
                keys,
                previous,
                stats.prompt_tokens,
                stats.reused_tokens,
                stats.completion_tokens,
                time.monotonic() - started,
                stats.finish_reason,
            )
    finally:
        if handoff is not None:
            handoff.close()
