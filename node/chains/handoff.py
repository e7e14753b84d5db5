"""The streaming hand-off between chain steps: while step k generates, step k+1's prompt is evaluated on a warm-up
sequence of the engine (node.inference.engine.Warmup): its head (the chat template and the step's prompt up to
`{previous}`) at once, then step k's text in chunks as it streams. When step k ends, step k+1 starts on that sequence
with its exact prompt tokens and evaluates only what the warm-up did not already hold: the last chunk, the tokens
held back, and the template after `{previous}`.

The output cannot change: step k+1's prompt is tokenized whole, as without the hand-off, and only the prefix its
sequence holds exactly (same tokens, same adapters) is reused; a partial text that tokenizes differently at its end
costs reuse, never correctness."""

import uuid
from collections.abc import Awaitable, Callable

import trio

from marketplace.chain import render
from node.adapters.cache import AdapterRef
from node.chains.resolve import RunnableStep
from node.inference.engine import InferenceEngine, Job, Warmup
from node.inference.models import BaseModel, PromptText

HOLD_TOKENS = 2  # the last tokens of a partial text may tokenize differently once more text follows
CHUNK_CHARS = 96  # ~24 tokens of step k's text per warm-up decode: fewer decodes cost less (bench/chains.py)

StartJob = Callable[[list[int], tuple[AdapterRef, ...], Warmup | None], Awaitable[Job]]
"""Starts a step's generation from its prompt tokens: on the warm-up when given (it takes the warm-up over)."""


class Handoff:
    """Step k+1's prompt, evaluated on a warm-up while step k streams."""

    def __init__(
        self,
        model: BaseModel,
        warm: Warmup,
        head: PromptText | None,
        limiter: trio.CapacityLimiter,
        chunk_chars: int = CHUNK_CHARS,
    ) -> None:
        self.model, self.warm, self.head, self.limiter = model, warm, head, limiter  # head None: no {previous}
        self.chunk_chars = chunk_chars
        self.fed = 0  # characters of step k's text given to the warm-up so far

    async def feed(self, so_far: str) -> None:
        """Step k's text so far (whole); every `chunk_chars` more of it goes to the warm-up."""
        text = so_far.lstrip()  # the step's answer is passed on stripped
        if self.head is None or len(text) - self.fed < self.chunk_chars:
            return
        self.fed = len(text)
        prompt = PromptText(self.head.text + text, self.head.add_special, self.head.parse_special)
        tokens = await trio.to_thread.run_sync(self.model.prompt_tokens, prompt, limiter=self.limiter)
        self.warm.extend(tokens[:-HOLD_TOKENS])

    def close(self) -> None:
        """Give the warm-up's sequence back if its step never started."""
        self.warm.close()


class ChainSteps:
    """How a chain's steps reach the engine: each step's prompt is one user message in the served model's chat
    template; `handoff` off runs them strictly one after the other (the reference the bench compares with)."""

    def __init__(
        self,
        model: BaseModel,
        engine: InferenceEngine,
        start: StartJob,
        limiter: trio.CapacityLimiter,
        handoff: bool = True,
        chunk_chars: int = CHUNK_CHARS,
    ) -> None:
        self.model, self.engine, self._start, self.limiter, self.handoff = model, engine, start, limiter, handoff
        self.chunk_chars = chunk_chars

    async def start(self, message: str, adapters: tuple[AdapterRef, ...], handoff: Handoff | None) -> Job:
        """Start one step's generation (on the hand-off's warm-up when there is one)."""
        warm = handoff.warm if handoff is not None else None
        try:
            tokens = await trio.to_thread.run_sync(self.model.chat_tokens, _user(message), limiter=self.limiter)
        except BaseException:
            if warm is not None:
                warm.close()
            raise
        return await self._start(tokens, adapters, warm)

    async def prepare(self, step: RunnableStep, chain_input: str) -> Handoff | None:
        """Open the hand-off to `step` and evaluate its prompt's head; None when off or no slot is free."""
        if not self.handoff:
            return None
        mark = f"\x1e{uuid.uuid4().hex}\x1e"  # where `{previous}` goes
        full = await trio.to_thread.run_sync(
            self.model.chat_prompt, _user(render(step.step, chain_input, mark)), limiter=self.limiter
        )
        head, found, _ = full.text.partition(mark)
        prompt = PromptText(head, full.add_special, full.parse_special)
        tokens = await trio.to_thread.run_sync(self.model.prompt_tokens, prompt, limiter=self.limiter)
        warm = self.engine.warm(step.adapters, tokens[:-HOLD_TOKENS] if found else tokens)
        if warm is None:
            return None
        return Handoff(self.model, warm, prompt if found else None, self.limiter, self.chunk_chars)


def _user(message: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": message}]
