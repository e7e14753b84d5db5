"""The inference engine: continuous batching over one llama.cpp context, served from the trio loop.

One long-lived thread (the batch worker) owns the llama.cpp context and runs every `llama_decode`. Each running
request holds one of `slots` sequences (its own KV cache); each step decodes the next token of every generating
sequence, plus prompt chunks of newly admitted ones, in one batch. Why one thread: llama.cpp's OpenMP build keeps
a thread team per calling thread, and more teams than cores throttle all of them (measured in
docs/BENCHMARKS.md). Text goes to the loop with `TrioToken.run_sync_soon`, which never blocks the worker.

Requests beyond `slots` wait in a fair FIFO queue; one that waits longer than the queue timeout gets `EngineBusy`.
"""

import contextlib
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from node.adapters.cache import AdapterCache, AdapterRef
from node.adapters.check import AdapterRejected, BaseDims, base_dims
from node.core.profiles import InferenceSettings
from node.inference.llama_backend import (
    AdapterLoadError,
    BatchContext,
    ContextOverflowError,
    DecodeError,
    GenerationStats,
    GrammarError,
    LlamaModel,
    LoraAdapter,
    SamplingParams,
    common_prefix_len,
    free_sampler,
    make_sampler,
)
from node.inference.textstream import StopMatcher, Utf8Stream

log = logging.getLogger(__name__)
STREAM_INTERVAL_S = 0.02  # at most 50 wakes of the loop per second per stream


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
    adapters: tuple[AdapterRef, ...] = ()

    @property
    def adapter_key(self) -> "AdapterKey":
        """The exact adapter set (versions and scales) this generation runs with; () = the base alone."""
        return tuple((a.key, a.scale) for a in self.adapters)


AdapterKey = tuple[tuple[str, float], ...]


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
    error_code: str = "generation_failed"
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
    """Owns the model's batch context; `run()` hosts the batch worker for the daemon's lifetime."""

    def __init__(self, model: LlamaModel, settings: InferenceSettings) -> None:
        self.model = model
        self.settings = settings
        self.context = BatchContext(model, settings.n_ctx, settings.slots, settings.batch_size, settings.threads)
        try:
            dims: BaseDims | None = base_dims(model.meta)
        except ValueError:
            dims = None
        self.adapters = AdapterCache(model, dims, settings.adapter_cache_mb * 1024 * 1024)
        self._seqs = [_Sequence(i) for i in range(settings.slots)]
        self._free_seqs = list(reversed(self._seqs))
        self._sem = trio.Semaphore(settings.slots)
        self._ids = itertools.count(1)
        self._worker: _BatchWorker | None = None
        self._jobs: dict[int, tuple[Job, _Sequence, trio.MemorySendChannel[str]]] = {}
        self._closing = False
        self._avg_job_s = 2.0
        self.stream_interval_s = STREAM_INTERVAL_S
        self.waiting = 0
        self.completed = 0
        self.stopped = 0  # of the completed: stopped before their end (the client went away, or shutdown)

    @property
    def n_ctx(self) -> int:
        """Context length of each sequence (prompt plus completion)."""
        return self.context.n_ctx_seq

    @property
    def slots(self) -> int:
        """How many generations can run at once."""
        return len(self._seqs)

    @property
    def active(self) -> int:
        """Generations running now."""
        return len(self._jobs)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the batch worker, serve until cancelled, then stop the worker and free the context."""
        self._worker = _BatchWorker(self.context, self.adapters, trio.lowlevel.current_trio_token(), self._finished)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._closing = True
            worker, self._worker = self._worker, None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(worker.stop)
            self.context.close()

    async def submit(self, request: GenerationRequest, queue_timeout_s: float) -> Job:
        """Wait (FIFO) for a free slot, start the generation, and return its job."""
        if self._closing or self._worker is None:
            raise EngineShuttingDown("the node is shutting down")
        if len(request.prompt_tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(request.prompt_tokens)} tokens but the context holds {self.n_ctx}"
            )
        if not request.prompt_tokens:
            raise ValueError("empty prompt")
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
        if self._closing or self._worker is None:
            self._sem.release()
            raise EngineShuttingDown("the node is shutting down")
        seq = self._take_sequence(request.adapter_key, request.prompt_tokens)
        send, receive = trio.open_memory_channel[str](math.inf)
        job = Job(id=next(self._ids), request=request, receive=receive)
        self._jobs[job.id] = (job, seq, send)
        self._worker.submit(job, seq, _Outbox(send, job, self.stream_interval_s), time.monotonic())
        return job

    def _take_sequence(self, key: AdapterKey, prompt: list[int]) -> "_Sequence":
        """The free sequence whose KV cache is worth most to `prompt`: the prefix it shares (built with the same
        adapters) counts for it, what it holds beyond that (lost when overwritten) against it; ties go to the one
        idle longest. So a conversation's next turn (or a chain's prepared step) finds its cache, and an unrelated
        chat takes an idle sequence rather than the cache of one that may continue."""

        def worth(i: int) -> tuple[int, int]:
            seq = self._free_seqs[i]
            shared = common_prefix_len(seq.cached, prompt) if seq.adapter_key == key else 0
            return 2 * shared - len(seq.cached), -i

        return self._free_seqs.pop(max(range(len(self._free_seqs)), key=worth))

    def _finished(self, job: Job, stats: GenerationStats | None, error: "_Failure | None", began: float) -> None:
        """Called on the loop (via run_sync_soon) after the worker's last delivery for `job`."""
        _, seq, send = self._jobs.pop(job.id)
        if stats is not None:
            job.stats = stats
        if error is not None:
            job.error, job.error_code = error.message, error.code
        send.close()
        self._free_seqs.append(seq)
        self._sem.release()
        self.completed += 1
        if job.stop_event.is_set():
            self.stopped += 1
        self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * (time.monotonic() - began)
        job.done.set()

    def begin_shutdown(self) -> None:
        """Refuse new generations from now on."""
        self._closing = True

    async def drain(self, grace_s: float) -> None:
        """Let running generations finish for up to `grace_s`, then cut the rest at their next token."""
        self.begin_shutdown()
        with trio.move_on_after(grace_s):
            while self._jobs:
                await next(iter(self._jobs.values()))[0].done.wait()
        for job, _, _ in list(self._jobs.values()):
            job.cut_by_shutdown = True
            job.cancel()
        while self._jobs:
            await next(iter(self._jobs.values()))[0].done.wait()


class _Outbox:
    """Hands a job's text from the worker thread to the loop, waking the loop at most every `interval_s`.

    Each wake of the trio loop costs GIL hand-offs while llama.cpp's threads hold both cores; coalescing text
    into one wake per `interval_s` (the first token always goes at once) kept generation through the engine
    within a few percent of a bare llama.cpp loop (docs/BENCHMARKS.md). `flush()` sends whatever is left.
    """

    def __init__(self, send: trio.MemorySendChannel[str], job: Job, interval_s: float) -> None:
        self.send, self.job, self.interval_s = send, job, interval_s
        self.token = trio.lowlevel.current_trio_token()
        self.lock = threading.Lock()
        self.pending: list[str] = []
        self.scheduled = False
        self.last_wake = 0.0

    def deliver(self, text: str) -> None:
        """Queue text (worker thread); wake the loop if the interval has passed."""
        now = time.monotonic()
        with self.lock:
            self.pending.append(text)
            if self.scheduled or now - self.last_wake < self.interval_s:
                return
            self.scheduled = True
            self.last_wake = now
        self.token.run_sync_soon(self._put)

    def flush(self) -> None:
        """Send what is pending now (worker thread), before the job is reported finished."""
        with self.lock:
            if self.scheduled or not self.pending:
                return
            self.scheduled = True
        self.token.run_sync_soon(self._put)

    def _put(self) -> None:
        with self.lock:
            text = "".join(self.pending)
            self.pending.clear()
            self.scheduled = False
        try:
            self.send.send_nowait(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.job.cancel()  # nobody reads any more (client went away)


@dataclass
class _Sequence:
    """One KV-cache sequence of the batch context and the tokens it holds."""

    id: int
    cached: list[int] = field(default_factory=list)
    adapter_key: AdapterKey = ()  # the adapters the cached KV was computed with


class _Running:
    """Worker-side state of one generation."""

    def __init__(
        self,
        job: Job,
        seq: _Sequence,
        outbox: _Outbox,
        began: float,
        n_ctx: int,
        model: LlamaModel,
        loras: list[tuple[LoraAdapter, float]],
    ) -> None:
        req = job.request
        self.job, self.seq, self.began = job, seq, began
        self.loras = loras
        self.key = req.adapter_key
        self.prompt = req.prompt_tokens
        self.sampler = make_sampler(req.sampling, model.n_vocab, model.vocab)
        self.limit = min(req.max_tokens, n_ctx - len(self.prompt))
        self.utf8 = Utf8Stream()
        self.matcher = StopMatcher(req.stop) if req.stop else None
        self.collected: list[str] = []
        self.outbox = outbox
        self.emit: Callable[[str], object] = outbox.deliver if req.stream else self.collected.append
        self.ignore_eos = req.ignore_eos
        self.stats = GenerationStats(prompt_tokens=len(self.prompt))
        self.t_admit = time.perf_counter()
        self.t_first = 0.0
        self.last: int | None = None  # sampled, not yet decoded
        # prefix reuse: keep the cached tokens shared with this prompt (at least one prompt token is decoded)
        keep = min(common_prefix_len(seq.cached, self.prompt), len(self.prompt) - 1)
        self.stats.reused_tokens = keep
        self.pos = keep  # prompt tokens already in the KV cache

    def text(self, token: int, piece: Callable[[int], bytes]) -> bool:
        """Turn a sampled token into text and emit it; False once a stop string appears."""
        text = self.utf8.push(piece(token))
        hit = False
        if self.matcher is not None:
            text, hit = self.matcher.push(text)
        if text:
            self.emit(text)
        if hit:  # the generation ends here; nothing after the stop string may be emitted by finish()
            self.matcher = None
            self.utf8 = Utf8Stream()
        return not hit

    def finish(self, reason: str) -> GenerationStats:
        """Flush held-back text, deliver a non-streamed answer, and complete the stats."""
        tail = self.utf8.flush()
        if self.matcher is not None:
            text, _ = self.matcher.push(tail)
            tail = text + self.matcher.flush()
        if tail:
            self.emit(tail)
        if self.collected:
            self.outbox.deliver("".join(self.collected))
        self.outbox.flush()
        now = time.perf_counter()
        self.stats.finish_reason = reason
        self.stats.prompt_s = (self.t_first or now) - self.t_admit
        self.stats.generate_s = now - (self.t_first or now)
        return self.stats


_STOP = object()


@dataclass(frozen=True)
class _Failure:
    """Why a generation failed, for the API's error object."""

    code: str
    message: str


class _BatchWorker:
    """The thread that owns the llama.cpp context and steps every running sequence together.

    Sequences are grouped by adapter set: each group is one `llama_decode` with its adapters attached (a switch is
    one `llama_set_adapters_lora` call, < 0.2 ms). A sequence whose adapter set changes loses its KV cache (it
    was computed with other weights); no other state is touched.
    """

    def __init__(
        self,
        context: BatchContext,
        adapters: AdapterCache,
        token: trio.lowlevel.TrioToken,
        finished: Callable[[Job, GenerationStats | None, _Failure | None, float], None],
    ) -> None:
        self.ctx = context
        self.adapters = adapters
        self.attached: AdapterKey = ()
        self.token = token
        self.finished = finished
        adapters.detach = self._detach
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="mirador-batch", daemon=True)
        self.thread.start()

    def submit(self, job: Job, seq: _Sequence, outbox: _Outbox, began: float) -> None:
        """Hand a new generation to the worker (thread-safe)."""
        self.inbox.put((job, seq, outbox, began))

    def stop(self) -> None:
        """Stop the worker after its current step (running jobs end as cut) and wait for it."""
        self.inbox.put(_STOP)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        active: list[_Running] = []
        while True:
            try:
                item = self.inbox.get(block=not active)
                while True:
                    if item is _STOP:
                        for r in active:
                            r.job.cut_by_shutdown = True
                            self._done(r, r.finish("stop"))
                        self.adapters.close()
                        return
                    admitted = self._admit(*item)
                    if admitted is not None:
                        active.append(admitted)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
            groups: dict[AdapterKey, list[_Running]] = {}
            for r in active:
                groups.setdefault(r.key, []).append(r)
            active = []
            for key, members in groups.items():
                if key != self.attached:
                    self._attach(key, members[0].loras)
                active.extend(self._step(members))

    def _admit(self, job: Job, seq: _Sequence, outbox: _Outbox, began: float) -> "_Running | None":
        """Load the job's adapters and set up its sequence; None (job failed) if an adapter cannot be loaded."""
        refs = job.request.adapters
        try:
            loras = self.adapters.acquire(refs)
        except (AdapterRejected, AdapterLoadError, OSError) as exc:
            log.error("generation %d: %s", job.id, exc)
            message = f"adapter {', '.join(r.key for r in refs)} could not be loaded: {exc}"
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self.finished, job, None, _Failure("adapter_unavailable", message), began)
            return None
        key = job.request.adapter_key
        if seq.adapter_key != key:  # its KV cache holds another personality's state
            self.ctx.forget(seq.id)
            seq.cached.clear()
            seq.adapter_key = key
        try:
            r = _Running(job, seq, outbox, began, self.ctx.n_ctx_seq, self.ctx.model, loras)
        except GrammarError as exc:  # the API compiles grammars first; this is the engine's own guard
            self.adapters.release(refs)
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self.finished, job, None, _Failure("invalid_grammar", str(exc)), began)
            return None
        self.ctx.forget(seq.id, r.pos)
        del seq.cached[r.pos :]
        return r

    def _attach(self, key: AdapterKey, loras: list[tuple[LoraAdapter, float]]) -> None:
        self.ctx.set_adapters(loras)
        self.attached = key
        self.adapters.attached = frozenset(k for k, _ in key)

    def _detach(self) -> None:
        self.ctx.set_adapters([])
        self.attached = ()

    def _step(self, active: list[_Running]) -> list[_Running]:
        """Decode one batch: next tokens of generating sequences first, then prompt chunks; sample; emit."""
        ctx = self.ctx
        piece, is_eog = ctx.model.piece, ctx.model.is_eog
        outputs: list[tuple[_Running, int]] = []
        still: list[_Running] = []
        for r in active:
            if r.job.stop_event.is_set():
                self._done(r, r.finish("stop"))
            elif r.last is not None:
                outputs.append((r, ctx.add(r.last, len(r.seq.cached), r.seq.id, True)))
                r.seq.cached.append(r.last)
                still.append(r)
            else:
                still.append(r)
        for r in still:
            if r.last is None and r.pos < len(r.prompt) and ctx.room:
                take = min(len(r.prompt) - r.pos, ctx.room)
                for i in range(r.pos, r.pos + take):
                    index = ctx.add(r.prompt[i], i, r.seq.id, i == len(r.prompt) - 1)
                r.seq.cached.extend(r.prompt[r.pos : r.pos + take])
                r.pos += take
                if r.pos == len(r.prompt):
                    outputs.append((r, index))
        if not ctx.n_tokens:
            return still
        try:
            ctx.decode()
        except DecodeError as exc:
            log.error("%s; failing %d generations", exc, len(still))
            for r in still:
                ctx.forget(r.seq.id)
                r.seq.cached.clear()
                self._done(r, None, _Failure("generation_failed", str(exc)))
            return []
        ended: set[int] = set()
        for r, index in outputs:
            tok = ctx.sample(r.sampler, index)
            if r.stats.completion_tokens == 0:
                r.t_first = time.perf_counter()
            reason = None
            if not r.ignore_eos and is_eog(tok):
                reason = "stop"
            else:
                r.stats.completion_tokens += 1
                if not r.text(tok, piece):
                    reason = "stop"
                elif r.stats.completion_tokens >= r.limit:
                    reason = "length"
            if reason is None:
                r.last = tok
            else:
                ended.add(id(r))
                self._done(r, r.finish(reason))
        return [r for r in still if id(r) not in ended]

    def _done(self, r: _Running, stats: GenerationStats | None, error: _Failure | None = None) -> None:
        free_sampler(r.sampler)
        self.adapters.release(r.job.request.adapters)
        with contextlib.suppress(trio.RunFinishedError):  # loop gone (abrupt exit): nobody waits any more
            self.token.run_sync_soon(self.finished, r.job, stats, error, r.began)
