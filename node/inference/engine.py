"""The inference engine: continuous batching over one llama.cpp context, served from the trio loop.

One long-lived thread (the batch worker) owns the llama.cpp context and runs every `llama_decode`. Each running
request holds one of `slots` sequences (its own KV cache); each step decodes the next token of every generating
sequence, plus prompt chunks of newly admitted ones, in one batch. Why one thread: llama.cpp's OpenMP build keeps
a thread team per calling thread, and more teams than cores throttle all of them (measured in
docs/BENCHMARKS.md). Text goes to the loop with `TrioToken.run_sync_soon`, which never blocks the worker.

Requests beyond `slots` wait in a fair FIFO queue; one that waits longer than the queue timeout gets `EngineBusy`.

A warm-up (`InferenceEngine.warm`) holds a sequence for a generation whose prompt is still arriving (a chain's next
step while the current one streams): its tokens are evaluated as they come, in the same loop as everything else (in
the same `llama_decode` when its adapter set is the one attached, else in the next), and `Warmup.start` turns it into
the generation, which then finds its prompt's prefix in the KV cache. A warm-up only takes a slot nobody waits for.

One row alone: llama.cpp computes a decode of one row with other kernels than a decode of several, so the same token
at the same position gets logits up to 0.9 apart (measured on the embedded model; two or more rows agree bit for bit
whatever their chunking or neighbours, flash attention being off: llama_backend.BatchContext). So a prompt is never
left with one token to decode alone, and a warm-up never decodes one token alone nor joins a generating sequence's
decode (whose one row it would make several): a reused or warmed prefix then gives exactly the text a fresh prompt
gives on a quiet engine (beside other generations, every row is computed as one of several either way).
"""

import contextlib
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
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

EngineEvent = tuple[str, int, int]
"""One entry of the engine's event record, in the worker's order: ("start", job id, prompt tokens reused from the
KV cache), ("token", job id, completion tokens so far) after each sampled token, ("warm", warm-up id, tokens its
sequence holds) after each decode that grew a warm-up."""


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
        self._warms: dict[int, _Warm] = {}
        self.record: deque[EngineEvent] | None = None  # set to a deque to keep the worker's events (tests, benches)
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
        self._worker = _BatchWorker(
            self.context, self.adapters, trio.lowlevel.current_trio_token(), self._finished, self._warm_closed, self
        )
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._closing = True
            worker, self._worker = self._worker, None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(worker.stop)
            self.context.close()

    def _check(self, request: GenerationRequest) -> None:
        if self._closing or self._worker is None:
            raise EngineShuttingDown("the node is shutting down")
        if len(request.prompt_tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(request.prompt_tokens)} tokens but the context holds {self.n_ctx}"
            )
        if not request.prompt_tokens:
            raise ValueError("empty prompt")

    async def submit(self, request: GenerationRequest, queue_timeout_s: float) -> Job:
        """Wait (FIFO) for a free slot, start the generation, and return its job."""
        self._check(request)
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
        return self._begin(request, self._take_sequence(request.adapter_key, request.prompt_tokens), None)

    def _begin(self, request: GenerationRequest, seq: "_Sequence", warm: "_Warm | None") -> Job:
        assert self._worker is not None
        send, receive = trio.open_memory_channel[str](math.inf)
        job = Job(id=next(self._ids), request=request, receive=receive)
        self._jobs[job.id] = (job, seq, send)
        self._worker.submit(job, seq, _Outbox(send, job, self.stream_interval_s), time.monotonic(), warm)
        return job

    def warm(self, adapters: tuple[AdapterRef, ...], tokens: list[int]) -> "Warmup | None":
        """Hold a free sequence for a generation whose prompt starts with `tokens` (more may follow with
        `Warmup.extend`) and evaluate them with `adapters` meanwhile; None when no slot is free or someone waits."""
        if self._closing or self._worker is None or self.waiting:
            return None
        try:
            self._sem.acquire_nowait()
        except trio.WouldBlock:
            return None
        key = tuple((a.key, a.scale) for a in adapters)
        tokens = tokens[: self.n_ctx - 1]
        w = _Warm(next(self._ids), self._take_sequence(key, tokens), adapters, key, tokens)
        self._warms[w.id] = w
        self._worker.inbox.put(w)
        return Warmup(self, w)

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

    def _warm_closed(self, w: "_Warm") -> None:
        """Called on the loop once the worker has let go of a warm-up that was closed, not started."""
        del self._warms[w.id]
        self._free_seqs.append(w.seq)
        self._sem.release()

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


class Warmup:
    """A sequence held and filled ahead of its generation (see `InferenceEngine.warm`): `extend` gives the prompt
    so far, `start` begins the generation on this sequence, `close` gives the sequence back unused."""

    def __init__(self, engine: InferenceEngine, w: "_Warm") -> None:
        self._engine = engine
        self._w: _Warm | None = w

    @property
    def id(self) -> int:
        """Its id in the engine's event record."""
        assert self._w is not None
        return self._w.id

    def extend(self, tokens: list[int]) -> None:
        """The prompt known so far (a whole prefix, not a delta; tokens beyond the held ones are evaluated next)."""
        worker = self._engine._worker
        if self._w is None or worker is None:
            return
        self._w.target = tokens[: self._engine.n_ctx - 1]
        worker.inbox.put(_WAKE)

    async def start(self, request: GenerationRequest) -> Job:
        """Begin `request` on this sequence (its prompt's prefix already in the KV cache where it matches)."""
        w, self._w = self._w, None
        if w is None:
            raise RuntimeError("this warm-up was already started or closed")
        try:
            self._engine._check(request)
        except BaseException:
            self._give_back(w)
            raise
        del self._engine._warms[w.id]
        return self._engine._begin(request, w.seq, w)

    def close(self) -> None:
        """Give the sequence back unused (safe to call after `start`: then it does nothing)."""
        w, self._w = self._w, None
        if w is not None:
            self._give_back(w)

    def _give_back(self, w: "_Warm") -> None:
        worker = self._engine._worker
        if worker is None:  # the engine has stopped: nothing runs on the sequence any more
            self._engine._warm_closed(w)
        else:
            worker.inbox.put(_Retire(w))


class _Warm:
    """Worker-side state of a warm-up: its sequence, adapters and the tokens it should hold."""

    retired = False  # by the worker only: started as a generation, closed, or failed

    def __init__(
        self, id: int, seq: "_Sequence", adapters: tuple[AdapterRef, ...], key: "AdapterKey", target: list[int]
    ) -> None:
        self.id, self.seq, self.refs, self.key = id, seq, adapters, key
        self.target = target  # replaced whole by the loop (an atomic rebinding), read once per step by the worker
        self.loras: list[tuple[LoraAdapter, float]] | None = None  # acquired (None until admitted, or failed)

    @property
    def busy(self) -> bool:
        """Whether its sequence holds tokens it should not, or lacks two or more it should."""
        if self.retired:
            return False
        target, cached = self.target, self.seq.cached
        keep = common_prefix_len(cached, target)
        return keep < len(cached) or len(target) - keep >= 2


@dataclass(frozen=True)
class _Retire:
    """Inbox message: a warm-up closed unused."""

    warm: _Warm


_WAKE = object()  # inbox message: a warm-up has more tokens


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

    retired = False
    busy = True

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
        # prefix reuse: keep the cached tokens shared with this prompt; at least two prompt tokens are decoded, so the
        # last one is never decoded alone (module docstring)
        keep = max(0, min(common_prefix_len(seq.cached, self.prompt), len(self.prompt) - 2))
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
        warm_closed: Callable[[_Warm], None],
        engine: InferenceEngine,
    ) -> None:
        self.ctx = context
        self.adapters = adapters
        self.attached: AdapterKey = ()
        self.token = token
        self.finished = finished
        self.warm_closed = warm_closed
        self.engine = engine  # read for its `record` only
        adapters.detach = self._detach
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="mirador-batch", daemon=True)
        self.thread.start()

    def submit(self, job: Job, seq: _Sequence, outbox: _Outbox, began: float, warm: _Warm | None = None) -> None:
        """Hand a new generation to the worker (thread-safe); `warm` is the warm-up whose sequence it takes over."""
        self.inbox.put((job, seq, outbox, began, warm))

    def _note(self, kind: str, id: int, value: int) -> None:
        record = self.engine.record
        if record is not None:
            record.append((kind, id, value))

    def stop(self) -> None:
        """Stop the worker after its current step (running jobs end as cut) and wait for it."""
        self.inbox.put(_STOP)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        active: list[_Running | _Warm] = []
        while True:
            try:
                item = self.inbox.get(block=not any(m.busy for m in active))
                while True:
                    if item is _STOP:
                        for m in active:
                            if isinstance(m, _Running):
                                m.job.cut_by_shutdown = True
                                self._done(m, m.finish("stop"))
                        self.adapters.close()
                        return
                    if isinstance(item, _Warm):
                        self._admit_warm(item)
                        active.append(item)
                    elif isinstance(item, _Retire):
                        self._retire(item.warm)
                        with contextlib.suppress(trio.RunFinishedError):
                            self.token.run_sync_soon(self.warm_closed, item.warm)
                    elif item is not _WAKE:
                        admitted = self._admit(*item)
                        if admitted is not None:
                            active.append(admitted)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
            groups: dict[AdapterKey, list[_Running | _Warm]] = {}
            for m in active:
                if not m.retired:
                    groups.setdefault(m.key, []).append(m)
            active = []
            for key, members in groups.items():
                runs = [m for m in members if isinstance(m, _Running)]
                warms = [m for m in members if isinstance(m, _Warm) and m.busy]
                active.extend(m for m in members if isinstance(m, _Warm) and not m.busy)  # no decode, no switch
                if not runs and not warms:
                    continue
                if key != self.attached:
                    loras = runs[0].loras if runs else warms[0].loras
                    self._attach(key, loras or [])
                if runs:
                    active.extend(self._step(runs))
                if warms:  # their own decode: see `_warm_step`
                    active.extend(self._warm_step(warms))

    def _admit_warm(self, w: _Warm) -> None:
        """Load a warm-up's adapters and keep what its sequence holds of its tokens; retired if they cannot load."""
        try:
            w.loras = self.adapters.acquire(w.refs)
        except (AdapterRejected, AdapterLoadError, OSError) as exc:
            log.warning("warm-up %d: %s; its generation will evaluate its whole prompt", w.id, exc)
            w.retired = True
            return
        if w.seq.adapter_key != w.key:
            self.ctx.forget(w.seq.id)
            w.seq.cached.clear()
            w.seq.adapter_key = w.key

    def _retire(self, w: _Warm) -> None:
        """Stop filling a warm-up (its sequence keeps what it holds) and release its adapters."""
        if not w.retired:
            w.retired = True
            if w.loras is not None:
                self.adapters.release(w.refs)

    def _admit(self, job: Job, seq: _Sequence, outbox: _Outbox, began: float, warm: _Warm | None) -> "_Running | None":
        """Load the job's adapters and set up its sequence; None (job failed) if an adapter cannot be loaded."""
        if warm is not None:
            self._retire(warm)
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
        self._note("start", job.id, r.pos)
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
                if len(r.prompt) - r.pos - take == 1 and take > 2:
                    take -= 1  # never leave one token to be decoded alone (one row alone: see the module docstring)
                for i in range(r.pos, r.pos + take):
                    index = ctx.add(r.prompt[i], i, r.seq.id, i == len(r.prompt) - 1)
                r.seq.cached.extend(r.prompt[r.pos : r.pos + take])
                r.pos += take
                if r.pos == len(r.prompt):
                    outputs.append((r, index))
        if not ctx.n_tokens:
            return still
        if not self._decode(still):
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
            self._note("token", r.job.id, r.stats.completion_tokens)
            if reason is None:
                r.last = tok
            else:
                ended.add(id(r))
                self._done(r, r.finish(reason))
        return [r for r in still if id(r) not in ended]

    def _decode(self, members: Sequence[_Running | _Warm]) -> bool:
        """Decode the batch built; if llama.cpp fails it, every member's sequence is emptied and the member failed
        (a generation) or retired (a warm-up: its generation evaluates its whole prompt itself); False then."""
        try:
            self.ctx.decode()
            return True
        except DecodeError as exc:
            log.error("%s; failing %d generations or warm-ups", exc, len(members))
            for m in members:
                self.ctx.forget(m.seq.id)
                m.seq.cached.clear()
                if isinstance(m, _Running):
                    self._done(m, None, _Failure("generation_failed", str(exc)))
                else:
                    self._retire(m)
            return False

    def _warm_step(self, warms: list[_Warm]) -> list[_Warm]:
        """Decode what the warm-ups' sequences lack of their tokens (dropping what no longer matches), in a decode of
        their own: riding in a generating sequence's decode would change its numbers (module docstring)."""
        ctx = self.ctx
        grown: list[_Warm] = []
        for w in warms:
            target, cached = w.target, w.seq.cached
            keep = common_prefix_len(cached, target)
            if keep < len(cached):  # the prompt so far was re-tokenized differently at its end
                ctx.forget(w.seq.id, keep)
                del cached[keep:]
            take = min(len(target) - keep, ctx.room)
            if take >= 2:  # one row alone would be computed otherwise than in its generation's prompt chunk
                for i in range(keep, keep + take):
                    ctx.add(target[i], i, w.seq.id, False)
                cached.extend(target[keep : keep + take])
                grown.append(w)
        if not ctx.n_tokens:
            return warms
        if not self._decode(grown):
            return [w for w in warms if not w.retired]
        for w in grown:
            self._note("warm", w.id, len(w.seq.cached))
        return warms

    def _done(self, r: _Running, stats: GenerationStats | None, error: _Failure | None = None) -> None:
        free_sampler(r.sampler)
        self.adapters.release(r.job.request.adapters)
        with contextlib.suppress(trio.RunFinishedError):  # loop gone (abrupt exit): nobody waits any more
            self.token.run_sync_soon(self.finished, r.job, stats, error, r.began)
