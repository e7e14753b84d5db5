"""A chat answered in several steps (node.inference.steps): the node-side tool loop (node.tools.loop) or a chain
(node.chains.run), streamed or whole.

Streamed, the answer's text arrives as ordinary content deltas, and each side event as a chunk of its own with no
choices and the event under its key (`tool_event`: {"type": "call", id, name, arguments} or {"type": "result", id,
name, content, error}; `chain_step`: a finished intermediate step): an OpenAI client reads the answer as usual and
ignores the events (the `openai` package keeps them in the chunk's `model_extra`). Whole, the response lists them
(`tool_events`, `steps`).
"""

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from node.api.common import ApiError
from node.api.openai_schema import error_body
from node.api.stream_parts import end_error, sse, usage_of
from node.inference.steps import StepDone, Text


class _Totals:
    def __init__(self) -> None:
        self.prompt = self.completion = self.cached = 0

    def add(self, done: StepDone) -> None:
        self.prompt += done.job.stats.prompt_tokens
        self.completion += done.job.stats.completion_tokens
        self.cached += done.job.stats.reused_tokens

    def usage(self) -> dict[str, Any]:
        return usage_of(self.prompt, self.completion, self.cached)


async def loop_answer(
    events: AsyncGenerator[Any, None],
    head: dict[str, Any],
    headers: dict[str, str],
    record: Callable[[str], Awaitable[None]],
    lists: tuple[str, ...] = (),
) -> JSONResponse:
    """The whole answer: the final message, the tool events, usage summed over every step."""
    text: list[str] = []
    side: dict[str, list[dict[str, Any]]] = {key: [] for key in lists}  # listed even when empty
    totals = _Totals()
    reason = "stop"
    async with aclosing(events):
        async for ev in events:
            if isinstance(ev, Text):
                text.append(ev.text)
            elif isinstance(ev, StepDone):
                totals.add(ev)
                if (err := end_error(ev.job)) is not None:
                    raise ApiError(
                        503 if ev.job.cut_by_shutdown else 500,
                        err["error"]["message"],
                        code=err["error"]["code"],
                        type_="server_error",
                    )
                reason = ev.job.stats.finish_reason
            else:
                side.setdefault(ev.LIST_KEY, []).append(ev.as_dict())
    answer = "".join(text)
    await record(answer)
    message = {"role": "assistant", "content": answer}
    choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
    body = (
        head
        | {
            "object": "chat.completion",
            "choices": [choice],
            "usage": totals.usage(),
        }
        | side
    )
    return JSONResponse(body, headers=headers)


async def loop_stream(
    events: AsyncGenerator[Any, None],
    head: dict[str, Any],
    headers: dict[str, str],
    record: Callable[[str], Awaitable[None]],
    include_usage: bool,
) -> StreamingResponse:
    """The streamed answer. The first event is awaited before the response starts, so that a request the engine
    refuses at once (busy, too long) gets its HTTP error; later refusals end the stream with an error chunk."""
    try:
        first = await anext(events, None)
    except BaseException:
        await events.aclose()
        raise

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return sse(head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    async def body() -> AsyncIterator[str]:
        text: list[str] = []
        totals = _Totals()
        failed = False
        yield chunk({"role": "assistant", "content": ""})
        pending = [first] if first is not None else []
        try:
            async for ev in _chain(pending, events):
                if isinstance(ev, Text):
                    text.append(ev.text)
                    yield chunk({"content": ev.text})
                elif isinstance(ev, StepDone):
                    totals.add(ev)
                    if (err := end_error(ev.job)) is not None:
                        failed = True
                        yield sse(err)
                        break
                    if ev.final:
                        yield chunk({}, ev.job.stats.finish_reason)
                else:
                    yield sse(head | {"choices": [], ev.STREAM_KEY: ev.as_dict()})
        except ApiError as exc:  # a later step refused by the engine (busy, shutting down)
            failed = True
            yield sse(error_body(exc.message, exc.type, exc.param, exc.code))
        finally:
            await events.aclose()  # the client may have gone: the step's job is cancelled
        if include_usage and not failed:
            yield sse(head | {"choices": [], "usage": totals.usage()})
        yield "data: [DONE]\n\n"
        if not failed:
            await record("".join(text))

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} | headers,
    )


async def _chain(first: list[Any], rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    for ev in first:
        yield ev
    async for ev in rest:
        yield ev
