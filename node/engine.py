"""The inference engine: a pool of llama.cpp slots served from one trio loop.

Each generation runs in a worker thread (its own CapacityLimiter, so HTTP and libp2p threads are never starved)
and hands text to the loop with `run_sync_soon`, which does not block the worker. Requests beyond the number of
slots wait in a fair FIFO queue; one that waits longer than the queue timeout is refused with `EngineBusy`.
"""

import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from node.llama_backend import ContextOverflowError, GenerationStats, LlamaModel, LlamaSlot, SamplingParams
from node.profiles import InferenceSettings
from node.textstream import StopMatcher, Utf8Stream

log = logging.getLogger(__name__)


class EngineBusy(Exception):
    """No slot became free within the queue timeout."""

    def __init__(self, waited_s: float, retry_after_s: int) -> None:
        super().__init__(f"all inference slots stayed busy for {waited_s:.1f} s")
        self.retry_after_s = retry_after_s


class EngineShuttingDown(Exception):
    """The node is stopping and takes no new generations."""


@dataclass
class GenerationRequest:
    """One generation: tokens in, sampling, limits, stop strings; `stream` delivers text token by token."""

    prompt_tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: Sequence[str] = ()
    stream: bool = True
    ignore_eos: bool = False


@dataclass
class Job:
    """A running generation: read its text with `text()`, then `stats`; `cancel()` stops it at the next token."""

    id: int
    request: GenerationRequest
    receive: trio.MemoryReceiveChannel[str]
    stop_event: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats = field(default_factory=GenerationStats)
    cut_by_shutdown: bool = False
    error: str | None = None
    done: trio.Event = field(default_factory=trio.Event)

    def cancel(self) -> None:
        """Ask the worker to stop after the current token (safe from any thread)."""
        self.stop_event.set()

    async def text(self) -> AsyncIterator[str]:
        """Text deltas in order, until the generation ends."""
        async with self.receive:
            async for delta in self.receive:
                yield delta


class InferenceEngine:
    """Owns the model and its slots; `run()` hosts the jobs' tasks inside the daemon's nursery."""

    def __init__(self, model: LlamaModel, settings: InferenceSettings) -> None:
        self.model = model
        self.settings = settings
        self.slots = [
            LlamaSlot(model, settings.n_ctx, settings.batch_size, settings.threads) for _ in range(settings.slots)
        ]
        self._free = list(self.slots)
        self._sem = trio.Semaphore(len(self.slots))
        self._limiter = trio.CapacityLimiter(len(self.slots))
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._jobs: dict[int, Job] = {}
        self._closing = False
        self._avg_job_s = 2.0
        self.waiting = 0
        self.completed = 0

    @property
    def n_ctx(self) -> int:
        """Context length of every slot."""
        return self.slots[0].n_ctx

    @property
    def active(self) -> int:
        """Generations running now."""
        return len(self._jobs)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Host job tasks until cancelled; then free the slots."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for slot in self.slots:
                slot.close()

    async def submit(self, request: GenerationRequest, queue_timeout_s: float) -> Job:
        """Wait (FIFO) for a free slot, start the generation, and return its job."""
        if self._closing or self._nursery is None:
            raise EngineShuttingDown("the node is shutting down")
        if len(request.prompt_tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(request.prompt_tokens)} tokens but the context holds {self.n_ctx}"
            )
        started = time.monotonic()
        self.waiting += 1
        acquired = False
        try:
            with trio.move_on_after(queue_timeout_s):
                await self._sem.acquire()
                acquired = True
        finally:
            self.waiting -= 1
        if not acquired:
            raise EngineBusy(time.monotonic() - started, max(1, math.ceil(self._avg_job_s)))
        if self._closing:
            self._sem.release()
            raise EngineShuttingDown("the node is shutting down")
        slot = self._free.pop()
        send, receive = trio.open_memory_channel[str](math.inf)
        job = Job(id=next(self._ids), request=request, receive=receive)
        self._jobs[job.id] = job
        self._nursery.start_soon(self._run_job, job, slot, send)
        return job

    async def _run_job(self, job: Job, slot: LlamaSlot, send: trio.MemorySendChannel[str]) -> None:
        t0 = time.monotonic()
        try:
            async with send:
                deliver = self._deliverer(send, job)
                try:
                    job.stats = await trio.to_thread.run_sync(
                        _generate,
                        slot,
                        job,
                        deliver,
                        limiter=self._limiter,
                        abandon_on_cancel=False,  # type: ignore[call-arg]
                    )
                except Exception as exc:  # a llama.cpp failure ends this job, never the daemon
                    log.exception("generation %d failed", job.id)
                    job.error = f"generation failed: {exc}"
        finally:
            self._free.append(slot)
            self._sem.release()
            del self._jobs[job.id]
            self.completed += 1
            self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * (time.monotonic() - t0)
            job.done.set()

    @staticmethod
    def _deliverer(send: trio.MemorySendChannel[str], job: Job) -> Callable[[str], None]:
        token = trio.lowlevel.current_trio_token()

        def put(text: str) -> None:
            try:
                send.send_nowait(text)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                job.cancel()  # nobody reads any more (client went away)

        def deliver(text: str) -> None:
            token.run_sync_soon(put, text)

        return deliver

    def begin_shutdown(self) -> None:
        """Refuse new generations from now on."""
        self._closing = True

    async def drain(self, grace_s: float) -> None:
        """Let running generations finish for up to `grace_s`, then cut the rest at their next token."""
        self.begin_shutdown()
        with trio.move_on_after(grace_s):
            while self._jobs:
                await next(iter(self._jobs.values())).done.wait()
        for job in list(self._jobs.values()):
            job.cut_by_shutdown = True
            job.cancel()
        while self._jobs:
            await next(iter(self._jobs.values())).done.wait()


def _generate(slot: LlamaSlot, job: Job, deliver: Callable[[str], None]) -> GenerationStats:
    """Worker-thread body: evaluate the prompt, sample, decode text, apply stop strings, deliver text."""
    req = job.request
    stats = GenerationStats(prompt_tokens=len(req.prompt_tokens))
    t0 = time.perf_counter()
    stats.reused_tokens = slot.load_prompt(req.prompt_tokens)
    t1 = time.perf_counter()
    stats.prompt_s = t1 - t0
    piece = slot.model.piece
    utf8 = Utf8Stream()
    matcher = StopMatcher(req.stop) if req.stop else None
    collected: list[str] = []
    emit: Callable[[str], object] = deliver if req.stream else collected.append
    hit_stop = False

    def on_token(tok: int) -> bool:
        nonlocal hit_stop
        text = utf8.push(piece(tok))
        if matcher is not None:
            text, hit_stop = matcher.push(text)
        if text:
            emit(text)
        return not hit_stop

    n, finish = slot.generate(req.sampling, req.max_tokens, on_token, job.stop_event, req.ignore_eos)
    if not hit_stop:
        tail = utf8.flush()
        if matcher is not None:
            text, _ = matcher.push(tail)
            tail = text + matcher.flush()
        if tail:
            emit(tail)
    if collected:
        deliver("".join(collected))
    stats.completion_tokens = n
    stats.finish_reason = finish
    stats.generate_s = time.perf_counter() - t1
    return stats
