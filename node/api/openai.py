"""The OpenAI-compatible routes: models, chat completions and completions (streamed as SSE or whole).

No `from __future__ import annotations` here: FastAPI must see real types on route parameters, or it silently
turns `Request` into a query parameter.
"""

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import llama_cpp as ll
import trio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from node.adapters.cache import AdapterRef
from node.adapters.personalities import AUTO, Route, UnknownModelError
from node.adapters.store import UnknownAdapterError
from node.api.common import ApiError, check_auth, check_changes, db_limiter, node_of, parse_body
from node.api.memory import in_thread
from node.api.openai_schema import ChatCompletionRequest, CompletionRequest, NamedToolChoice
from node.api.stream_parts import end_error, sse, usage
from node.api.tool_loop import loop_answer, loop_stream
from node.chains.handoff import ChainSteps
from node.chains.resolve import ChainRefused, resolve_chain
from node.chains.run import run_chain
from node.inference.engine import EngineBusy, EngineShuttingDown, GenerationRequest, Job, Warmup
from node.inference.llama_backend import GrammarError, grammar_sampler
from node.inference.models import ToolFormat
from node.inference.structured import SchemaError, grammar_for
from node.memory.record import DEFAULT_NAMESPACE, MemoryRefused, check_namespace
from node.memory.service import MemoryService
from node.state import NodeState
from node.tools.calls import (
    ToolChoiceError,
    call_grammar,
    call_id,
    parse_call,
    render_call,
    tool_prompt,
    with_system,
)
from node.tools.loop import LoopEvent, ToolCalled, tool_loop
from node.tools.registry import Tool, ToolRefused

log = logging.getLogger(__name__)

PERSONALITY_HEADER = "X-Mirador-Personality"
ADAPTERS_HEADER = "X-Mirador-Adapters"
NAMESPACE_HEADER = "X-Mirador-Namespace"
MEMORY_HEADER = "X-Mirador-Memory-Ids"
_tokenize_limiter = trio.CapacityLimiter(2)
_chain_limiter = trio.CapacityLimiter(1)  # a chain's verification hashes its files: one at a time
router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The models this node serves."""
    check_auth(request)
    node = node_of(request)
    created = int(node.model.path.stat().st_mtime)
    data = [{"id": node.model.id, "object": "model", "created": created, "owned_by": "mirador"}]
    for p in node.manifest.personalities():
        data.append(
            {
                "id": p.name,
                "object": "model",
                "created": created,
                "owned_by": "mirador",
                "personality": {
                    "adapters": dict(p.adapters),
                    "load_on": [" ".join(k) for k in p.keywords],
                    "tools": list(p.tools),
                },
            }
        )
    return {"object": "list", "data": data}


def _route(node: NodeState, model: str, message: str | None) -> tuple[Route, tuple[AdapterRef, ...]]:
    try:
        return node.resolve(model, message)
    except UnknownModelError:
        available = ", ".join([*node.model.names(), AUTO, *(p.name for p in node.manifest.personalities())])
        raise ApiError(
            404,
            f"the model '{model}' does not exist on this node; available: {available}, or base:<adapter>",
            param="model",
            code="model_not_found",
        ) from None
    except (UnknownAdapterError, ValueError) as exc:
        raise ApiError(404, str(exc), param="model", code="adapter_not_found") from None


async def _start(
    node: NodeState,
    tokens: list[int],
    req: Any,
    limit: int | None,
    adapters: tuple[AdapterRef, ...],
    grammar: str | None = None,
    warm: Warmup | None = None,
) -> Job:
    """Start a generation (on `warm`'s sequence when given: it is taken over, or given back if this fails)."""
    n_ctx = node.engine.n_ctx
    if len(tokens) >= n_ctx:
        if warm is not None:
            warm.close()
        raise ApiError(
            400,
            f"the prompt is {len(tokens)} tokens long; this node's context holds {n_ctx} "
            "(prompt plus completion); shorten the prompt",
            param="messages",
            code="context_length_exceeded",
        )
    cap = node.settings.max_tokens
    gen = GenerationRequest(
        prompt_tokens=tokens,
        sampling=dataclasses.replace(req.sampling(), grammar=grammar),
        max_tokens=min(limit or cap, cap),
        stop=req.stop_list(),
        stream=req.stream,
        ignore_eos=req.ignore_eos,
        adapters=adapters,
    )
    try:
        if warm is not None:
            return await warm.start(gen)
        return await node.engine.submit(gen, node.config.api.queue_timeout_s)
    except EngineBusy as exc:
        raise ApiError(
            503,
            f"the node is busy: {exc}; retry later",
            code="server_busy",
            type_="server_error",
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    except EngineShuttingDown:
        raise ApiError(
            503, "the node is shutting down", code="shutting_down", type_="server_error", headers={"Retry-After": "5"}
        ) from None


def _stream(
    job: Job,
    head: dict[str, Any],
    delta_key: Callable[[str], dict[str, Any]],
    first: dict[str, Any] | None,
    include_usage: bool,
    headers: dict[str, str],
    record: Callable[[str], Awaitable[None]],
    finish_reason: str | None = None,
    buffered: Callable[[str, str], list[dict[str, Any]]] | None = None,
) -> StreamingResponse:
    """SSE stream: chunks sharing `head`, each choice built by `delta_key`, then finish, usage, [DONE].

    `finish_reason` replaces the job's own "stop" (a tool call ends with "tool_calls"); with `buffered`, nothing is sent
    until the answer is whole, then the choices `buffered(text, finish_reason)` builds (a call or text, `auto`)."""
    prefix = json.dumps(head, separators=(",", ":"))[:-1] + ',"choices":['

    def chunk(choice: dict[str, Any]) -> str:
        return "data: " + prefix + json.dumps(choice, separators=(",", ":"), ensure_ascii=False) + "]}\n\n"

    async def body() -> AsyncIterator[str]:
        parts: list[str] = []
        try:
            if first is not None:
                yield chunk(first)
            async for delta in job.text():
                parts.append(delta)
                if buffered is None:
                    yield chunk(delta_key(delta))
            err = end_error(job)
            if err is not None:
                yield sse(err)
            else:
                if buffered is not None:
                    for choice in buffered("".join(parts), job.stats.finish_reason):
                        yield chunk(choice)
                else:
                    reason = job.stats.finish_reason
                    if finish_reason is not None and reason == "stop":
                        reason = finish_reason
                    yield chunk(delta_key("") | {"finish_reason": reason})
                if include_usage:
                    yield sse(head | {"choices": [], "usage": usage(job)})
            yield "data: [DONE]\n\n"
            await record("".join(parts))
        finally:
            job.cancel()  # the client may have gone away: stop generating

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} | headers,
    )


async def _collect(job: Job) -> str:
    try:
        parts = [delta async for delta in job.text()]
    finally:
        job.cancel()
    err = end_error(job)
    if err is not None:
        raise ApiError(
            503 if job.cut_by_shutdown else 500,
            err["error"]["message"],
            code=err["error"]["code"],
            type_="server_error",
        )
    return "".join(parts)


async def _by_meaning(node: NodeState, model: str, chosen: Route, latest: str | None) -> tuple[str, float] | None:
    """Under `auto`, when no keyword chose a personality: the one closest in meaning, if close enough."""
    if node.memory is None or chosen.personality is not None or not latest:
        return None
    if model not in (AUTO, node.model.id):  # `base` means the base, never routed
        return None
    personalities = node.manifest.personalities()
    if not personalities:
        return None
    try:
        return await in_thread(node.memory.route, latest, personalities)
    except Exception:
        log.exception("semantic routing failed; the base answers")
        return None


async def _grammar(node: NodeState, req: ChatCompletionRequest) -> str | None:
    """The grammar of the request's tool calls or `response_format`, checked by llama.cpp itself; a 400 if it cannot
    be enforced."""
    mode = req.tool_mode()
    if mode is not None:
        try:
            grammar: str | None = call_grammar(req.tool_list(), mode, node.model.tool_format)
        except ToolChoiceError as exc:
            raise ApiError(400, str(exc), param="tool_choice", code="invalid_tools") from None
    elif (fmt := req.response_format) is not None:
        try:
            grammar = grammar_for(fmt.type, fmt.json_schema.schema_ if fmt.json_schema else None)
        except SchemaError as exc:
            raise ApiError(400, str(exc), param="response_format", code="invalid_response_format") from None
    else:
        return None
    if grammar is None:
        return None

    try:
        await _compiles(node, grammar)
    except GrammarError:
        raise ApiError(
            400,
            "this JSON schema's grammar is refused by llama.cpp",
            param="tool_choice" if mode is not None else "response_format",
            code="invalid_response_format",
        ) from None
    return grammar


async def _compiles(node: NodeState, grammar: str) -> None:
    """GrammarError unless llama.cpp parses `grammar` (checked before a job, so a bad one is a 400, not a 500)."""

    def compile_it() -> None:
        ll.llama_sampler_free(grammar_sampler(node.model.llama.vocab, grammar))

    await trio.to_thread.run_sync(compile_it, limiter=_tokenize_limiter)


async def _check_loop_grammars(node: NodeState, tools: list[Tool], first: str) -> None:
    """The node loop's grammars (its first step's and `auto`) compile, or the request is refused (400)."""
    specs = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools]
    try:
        for choice in dict.fromkeys([first, "auto"]):
            await _compiles(node, call_grammar(specs, choice, node.model.tool_format))
    except (ToolChoiceError, GrammarError) as exc:
        detail = f"the node tools {', '.join(t.name for t in tools)} cannot be constrained: {exc}"
        raise ApiError(400, detail, param="node_tools", code="invalid_tools") from None


def _prompt_message(m: Any, fmt: ToolFormat) -> dict[str, str]:
    """A request message as the model reads it: earlier tool calls as the call objects it is asked to write."""
    text = m.text()
    if m.tool_calls:
        calls = "\n".join(render_call(c.function.name, c.function.arguments, fmt) for c in m.tool_calls)
        text = f"{text}\n{calls}".strip()
    return {"role": m.role, "content": text}


class Recall(NamedTuple):
    """The memory a chat used: its namespace (None: memory off for this request) and the memories injected."""

    namespace: str | None
    ids: list[str]
    context: str = ""


async def _recall(request: Request, node: NodeState, req: ChatCompletionRequest, latest: str | None) -> Recall:
    """The memories to inject into this chat, from the request's namespace (field, header, or the default)."""
    if node.memory is None or not req.memory:
        return Recall(None, [])
    raw = req.namespace or request.headers.get(NAMESPACE_HEADER) or DEFAULT_NAMESPACE
    try:
        namespace = check_namespace(raw)
    except MemoryRefused as exc:
        raise ApiError(400, exc.detail, param="namespace", code="memory_invalid_namespace") from None
    budget = min(node.settings.memory_tokens, node.engine.n_ctx // 4)
    if not latest or budget <= 0:
        return Recall(namespace, [])
    llama = node.model.llama
    try:
        context, ids = await in_thread(
            node.memory.context_for, namespace, latest, budget, lambda t: len(llama.tokenize(t, False, False))
        )
    except ApiError as exc:
        if exc.code != "memory_indexing":
            raise
        log.info("memory: %s; answering without memories", exc.message)
        return Recall(namespace, [])
    except Exception:
        log.exception("memory: recall failed; answering without memories")
        return Recall(namespace, [])
    return Recall(namespace, ids, context)


async def _remember(memory: MemoryService, namespace: str, user: str, answer: str, completion_id: str) -> None:
    try:
        await in_thread(memory.remember_exchange, namespace, user, answer, completion_id)
    except Exception:
        log.exception("memory: could not remember the exchange %s", completion_id)


class _Admitted(NamedTuple):
    req: Any
    job: Job | None  # None when the node runs tools: `loop` starts the generations
    head: dict[str, Any]
    tools: str | None  # the tool mode (ChatCompletionRequest.tool_mode)
    headers: dict[str, str]
    record: Callable[[str], Awaitable[None]]  # remembers a finished chat answer for feedback
    loop: Callable[[], AsyncGenerator[Any, None]] | None = None  # a tool loop or a chain (node.inference.steps)


def _node_tools(request: Request, node: NodeState, chosen: Route, req: ChatCompletionRequest) -> list[Tool]:
    """The tools the node runs for this chat: the request's `node_tools` and the personality's own. Running them
    changes things (the user's tools run with the user's rights), so they need the API token."""
    names = list(dict.fromkeys([*chosen.tools, *(req.node_tools or [])]))
    if not names or req.tool_choice == "none" or req.tools:
        return []
    if node.tools is None:
        raise ApiError(400, "tools are off on this node ([tools] enabled = false)", param="node_tools")
    if req.response_format is not None and req.response_format.type != "text":
        raise ApiError(400, f"{chosen.label} runs tools: a JSON response_format cannot be combined", "response_format")
    check_changes(request)
    try:
        return [node.tools.registry.get(n) for n in names]
    except ToolRefused as exc:
        raise ApiError(400, exc.detail, param="node_tools", code="unknown_tool") from None


def _first_choice(req: ChatCompletionRequest, tools: list[Tool]) -> str:
    """The node loop's first tool mode: `auto`, `required`, or the named tool (one of `tools`)."""
    if isinstance(req.tool_choice, NamedToolChoice):
        name = req.tool_choice.function.name
        if name not in {t.name for t in tools}:
            raise ApiError(400, f"tool_choice names {name!r}, which is not among the node tools", param="tool_choice")
        return name
    return "required" if req.tool_choice == "required" else "auto"


async def _admit(request: Request, schema: type[Any], id_prefix: str, obj: str) -> _Admitted:
    """Shared front of both generation routes: auth, schema, routing, tokens, slot."""
    check_auth(request)
    node = node_of(request)
    req = await parse_body(request, schema)
    messages: list[dict[str, str]] | None = None  # only chat answers can get feedback
    recall = Recall(None, [])
    meaning: tuple[str, float] | None = None
    tools: str | None = None
    latest: str | None = None
    loop: Callable[[], AsyncGenerator[Any, None]] | None = None
    if isinstance(req, ChatCompletionRequest) and req.model.startswith(CHAIN_PREFIX):
        latest = next((m.text() for m in reversed(req.messages) if m.role == "user"), None)
        messages = [{"role": "user", "content": latest or ""}]
        chosen, adapters, loop = await _chain_loop(node, req, latest)
        tokens = []
    elif isinstance(req, ChatCompletionRequest):
        fmt = node.model.tool_format
        messages = [_prompt_message(m, fmt) for m in req.messages]
        latest = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        chosen, adapters = _route(node, req.model, latest)
        meaning = await _by_meaning(node, req.model, chosen, latest)
        if meaning is not None:
            chosen, adapters = _route(node, meaning[0], latest)
        node_tools = _node_tools(request, node, chosen, req)
        tools = req.tool_mode()
        if tools is None and not node_tools and req.tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice asks for a tool call, but no tools are given", param="tool_choice")
        recall = await _recall(request, node, req, latest)
        prompt = with_system(messages, recall.context)
        if node_tools:
            first = _first_choice(req, node_tools)
            await _check_loop_grammars(node, node_tools, first)
            loop = _loop_of(node, req, prompt, node_tools, first, adapters)
        template_tools = None
        if tools is not None:
            prompt, template_tools = tool_prompt(prompt, req.tool_list(), fmt)
        tokens = await trio.to_thread.run_sync(
            node.model.chat_tokens, prompt, template_tools, limiter=_tokenize_limiter
        )
    else:
        chosen, adapters = _route(node, req.model, req.text())
        tokens = await trio.to_thread.run_sync(node.model.completion_tokens, req.text(), limiter=_tokenize_limiter)
    grammar = await _grammar(node, req) if isinstance(req, ChatCompletionRequest) and loop is None else None
    job = await _start(node, tokens, req, req.limit(), adapters, grammar) if loop is None else None
    head = {
        "id": f"{id_prefix}-{uuid.uuid4().hex[:24]}",
        "object": obj,
        "created": int(time.time()),
        "model": req.model,
        "personality": chosen.label,
    }
    headers = {PERSONALITY_HEADER: chosen.label, ADAPTERS_HEADER: ",".join(a.key for a in adapters) or "none"}
    if meaning is not None:
        head["route"] = {"by": "meaning", "similarity": round(meaning[1], 4)}
    if recall.namespace is not None:
        head["memory"] = {"namespace": recall.namespace, "ids": recall.ids}
        headers |= {NAMESPACE_HEADER: recall.namespace, MEMORY_HEADER: ",".join(recall.ids) or "none"}

    async def record(answer: str) -> None:
        if messages is None or (job is not None and (job.error or job.cut_by_shutdown)):
            return
        keys = [a.key for a in adapters]
        await trio.to_thread.run_sync(
            node.feedback.record_completion,
            head["id"],
            chosen.label,
            keys,
            messages,
            answer,
            recall.namespace,
            limiter=db_limiter,
        )
        if recall.namespace is not None and node.memory is not None and latest:
            await _remember(node.memory, recall.namespace, latest, answer, head["id"])

    return _Admitted(req, job, head, tools, headers, record, loop)


CHAIN_PREFIX = "chain:"


async def _chain_loop(
    node: NodeState, req: ChatCompletionRequest, latest: str | None
) -> tuple[Route, tuple[AdapterRef, ...], Callable[[], AsyncGenerator[Any, None]]]:
    """`model: "chain:NAME[@VERSION]"`: the installed chain, verified with its artifacts, run on the latest user
    message."""
    if req.tools or req.node_tools or (req.response_format is not None and req.response_format.type != "text"):
        raise ApiError(400, "a chain answers in text: tools and JSON formats cannot be combined with it", "model")
    if not latest:
        raise ApiError(400, "a chain needs a user message (its {input})", param="messages")
    target = req.model.removeprefix(CHAIN_PREFIX)
    try:
        runnable = await trio.to_thread.run_sync(resolve_chain, node, target, limiter=_chain_limiter)
    except ChainRefused as exc:
        raise ApiError(404, exc.detail, param="model", code="chain_refused") from None

    async def start(tokens: list[int], adapters: tuple[AdapterRef, ...], warm: Warmup | None) -> Job:
        return await _start(node, tokens, req, req.limit(), adapters, warm=warm)

    steps = ChainSteps(node.model, node.engine, start, _tokenize_limiter)
    label = f"{CHAIN_PREFIX}{runnable.chain.name}@{runnable.chain.version}"
    return Route(label), (), lambda: run_chain(runnable, latest, steps)


def _loop_of(
    node: NodeState,
    req: ChatCompletionRequest,
    prompt: list[dict[str, str]],
    tools: list[Tool],
    first: str,
    adapters: tuple[AdapterRef, ...],
) -> Callable[[], AsyncGenerator[LoopEvent, None]]:
    """The node-side tool loop of this chat, each step a generation on the same route."""
    specs = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools]
    registry = node.tools.registry if node.tools is not None else None
    assert registry is not None

    fmt = node.model.tool_format

    async def generate(convo: list[dict[str, str]], grammar: str | None, offered: bool) -> Job:
        template_tools = None
        if offered:
            convo, template_tools = tool_prompt(convo, specs, fmt)
        tokens = await trio.to_thread.run_sync(node.model.chat_tokens, convo, template_tools, limiter=_tokenize_limiter)
        return await _start(node, tokens, req, req.limit(), adapters, grammar)

    last = req.messages[-1]
    names = {t.name for t in tools}
    pending = [
        ToolCalled(c.id, c.function.name, c.function.arguments)
        for c in (last.tool_calls or [])
        if last.role == "assistant" and c.function.name in names
    ]
    return lambda: tool_loop(prompt, specs, first, generate, registry.call, pending, fmt)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    """OpenAI chat completions, streamed (SSE) or not; with tools, an answer may be a tool call."""
    req, job, head, tools, headers, record, loop = await _admit(
        request, ChatCompletionRequest, "chatcmpl", "chat.completion.chunk"
    )
    if loop is not None:
        if req.stream:
            return await loop_stream(loop(), head, headers, record, req.include_usage())
        lists = ("steps",) if req.model.startswith(CHAIN_PREFIX) else ("tool_events",)
        return await loop_answer(loop(), head, headers, record, lists)
    assert job is not None
    if req.stream:
        if tools is None:
            return _stream(
                job,
                head,
                lambda d: {"index": 0, "delta": {"content": d}, "finish_reason": None},
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                req.include_usage(),
                headers,
                record,
            )
        if tools not in ("auto", "required"):  # a named function: its arguments stream as they are generated
            call = {"index": 0, "id": call_id(), "type": "function", "function": {"name": tools, "arguments": ""}}
            return _stream(
                job,
                head,
                lambda d: {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": d}}]},
                    "finish_reason": None,
                },
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": None, "tool_calls": [call]},
                    "finish_reason": None,
                },
                req.include_usage(),
                headers,
                record,
                finish_reason="tool_calls",
            )
        return _stream(
            job,
            head,
            lambda d: {"index": 0, "delta": {"content": d}, "finish_reason": None},
            None,
            req.include_usage(),
            headers,
            record,
            buffered=lambda text, reason: _streamed_answer(text, reason, tools, node_of(request).model.tool_format),
        )
    text = await _collect(job)
    await record(text)
    message, reason = _answer(text, job.stats.finish_reason, tools, node_of(request).model.tool_format)
    choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
    return JSONResponse(head | {"object": "chat.completion", "choices": [choice], "usage": usage(job)}, headers=headers)


def _answer(text: str, reason: str, tools: str | None, fmt: ToolFormat) -> tuple[dict[str, Any], str]:
    """The assistant message of a whole answer and its finish reason: a tool call when the answer is one."""
    if tools is not None and reason != "length":  # an answer cut by max_tokens is returned as the text it is
        try:
            call = parse_call(text, tools, fmt)
        except (ValueError, KeyError, TypeError):  # cut short by a stop string: the text it is
            call = None
        if call is not None:
            name, arguments = call
            tool_call = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
            return {"role": "assistant", "content": None, "tool_calls": [tool_call]}, "tool_calls"
    return {"role": "assistant", "content": text}, reason


def _streamed_answer(text: str, reason: str, tools: str, fmt: ToolFormat) -> list[dict[str, Any]]:
    """The chunks of a buffered answer under `auto`/`required`: the call (or text), then the finish."""
    message, reason = _answer(text, reason, tools, fmt)
    if "tool_calls" in message:
        calls = [{"index": 0} | c for c in message["tool_calls"]]
        delta: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
    else:
        delta = {"role": "assistant", "content": text}
    return [{"index": 0, "delta": delta, "finish_reason": None}, {"index": 0, "delta": {}, "finish_reason": reason}]


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    """OpenAI (legacy) text completions, streamed (SSE) or not."""
    req, job, head, _, headers, record, _ = await _admit(request, CompletionRequest, "cmpl", "text_completion")
    assert job is not None
    if req.stream:
        return _stream(
            job,
            head,
            lambda d: {"index": 0, "text": d, "logprobs": None, "finish_reason": None},
            None,
            req.include_usage(),
            headers,
            record,
        )
    text = await _collect(job)
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": job.stats.finish_reason}
    return JSONResponse(head | {"choices": [choice], "usage": usage(job)}, headers=headers)
