"""The node-side tool loop: the model calls one of the node's tools, the node runs it and feeds the result back, until
the model answers in text (or the steps run out).

Each step is one generation under the tool-call grammar (node.tools.calls): the first by the request's
`tool_choice`, later ones `auto`, the last `none` (a final answer in text, whatever happened). A conversation that
ends with the assistant's calls of node tools (a client that decided the call itself) has them run first, and the
model answers from their results. A step whose first text
is not a call streams its text as the answer. A call's result, or the refusal of it (unknown tool, bad arguments, a
failure, a timeout), goes back to the model as a `tool` message: the model may answer from an error as well.
"""

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from node.inference.engine import Job
from node.inference.models import PLAIN, ToolFormat
from node.inference.steps import StepDone, Text
from node.tools.calls import call_grammar, call_id, parse_call, render_call
from node.tools.registry import ToolRefused

MAX_STEPS = 4

Generate = Callable[[list[dict[str, str]], str | None, bool], Awaitable[Job]]  # (messages, grammar, tools offered)
CallTool = Callable[[str, str], Awaitable[str]]


@dataclass(frozen=True)
class ToolCalled:
    """The model called a tool (arguments as JSON text)."""

    STREAM_KEY: ClassVar[str] = "tool_event"
    LIST_KEY: ClassVar[str] = "tool_events"
    id: str
    name: str
    arguments: str

    def as_dict(self) -> dict[str, Any]:
        """The call as the API shows it."""
        return {"type": "call", "id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class ToolAnswered:
    """A tool's result (or the refusal of the call, `error` = its reason)."""

    STREAM_KEY: ClassVar[str] = "tool_event"
    LIST_KEY: ClassVar[str] = "tool_events"
    id: str
    name: str
    content: str
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The result as the API shows it."""
        return {"type": "result", "id": self.id, "name": self.name, "content": self.content, "error": self.error}


LoopEvent = ToolCalled | ToolAnswered | Text | StepDone


def step_choice(step: int, first: str) -> str:
    """The tool mode of a step: the request's on the first, `auto` in between, `none` on the last."""
    if step == MAX_STEPS - 1:
        return "none"
    return first if step == 0 else "auto"


async def _run_call(called: ToolCalled, call_tool: CallTool) -> ToolAnswered:
    try:
        return ToolAnswered(called.id, called.name, await call_tool(called.name, called.arguments))
    except ToolRefused as exc:
        return ToolAnswered(called.id, called.name, f"error: {exc.detail}", error=str(exc.reason))


async def tool_loop(
    messages: list[dict[str, str]],
    tools: list[dict[str, Any]],
    first_choice: str,
    generate: Generate,
    call_tool: CallTool,
    pending: list[ToolCalled] | None = None,
    fmt: ToolFormat = PLAIN,
) -> AsyncGenerator[LoopEvent, None]:
    """Run the loop over `messages` with `tools` ({name, description, parameters}), the `pending` calls (the
    conversation's last message made them) first; yields what happens."""
    convo = list(messages)
    first_step = 0
    for called in pending or []:
        yield called
        answered = await _run_call(called, call_tool)
        yield answered
        convo.append({"role": "tool", "content": answered.content})
        first_step = 1
    for step in range(first_step, MAX_STEPS):
        choice = step_choice(step, first_choice)
        if choice == "none":
            job = await generate(convo, None, False)
        else:
            job = await generate(convo, call_grammar(tools, choice, fmt), True)
        parts: list[str] = []
        calling = choice not in ("none", "auto")  # required or named: the whole answer is a call
        decided = choice != "auto"  # under `auto` the first character decides: `{` (or `<`, a tag) opens a call
        try:
            async for delta in job.text():
                if not decided and delta:
                    decided, calling = True, delta.startswith(fmt.first_char())
                parts.append(delta)
                if not calling:
                    yield Text(delta)
        finally:
            job.cancel()
        text = "".join(parts)
        call = _parsed(text, choice, fmt) if calling and not job.error and job.stats.finish_reason == "stop" else None
        if call is None:
            if calling and text:  # a call cut short (length, stop string): the text it is
                yield Text(text)
            yield StepDone(job, final=True)
            return
        yield StepDone(job, final=False)
        name, arguments = call
        called = ToolCalled(call_id(), name, arguments)
        yield called
        answered = await _run_call(called, call_tool)
        yield answered
        convo += [
            {"role": "assistant", "content": render_call(name, arguments, fmt)},
            {"role": "tool", "content": answered.content},
        ]


def _parsed(text: str, choice: str, fmt: ToolFormat) -> tuple[str, str] | None:
    try:
        return parse_call(text, choice, fmt)
    except (ValueError, KeyError, TypeError):
        return None
