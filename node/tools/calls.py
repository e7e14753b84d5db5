"""OpenAI tool calls on a model without a tool template (the embedded SmolLM2's has none).

The tools are described in the system prompt, and a call is generated under a llama.cpp grammar, so that when the
model calls, the call parses and its arguments follow the function's JSON Schema:
- a named `tool_choice`: the grammar is the function's arguments (the name is given);
- `required`: one JSON object `{"name": ..., "arguments": {...}}`, one alternative per function;
- `auto`: the same object, or text that does not start with `{` — the model decides with its first token
  (on the 135M embedded model that is nearly always text: it rarely opens a call on its own);
- `none`: no tools in the prompt, free text.
One call per answer (`parallel_tool_calls` is accepted, and at most one call is made). Earlier calls and their
results are shown to the model as the assistant's call object and a `tool` message.
"""

import json
import re
import uuid
from typing import Any

from node.inference.structured import SchemaError, grammar_for

CALL_FORMAT = '{"name": <function name>, "arguments": <JSON object>}'


class ToolChoiceError(ValueError):
    """A `tool_choice` that names no given function, or tools this node cannot constrain."""


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The system-prompt block that lists the functions and the call format."""
    lines = [
        "You can call these functions. To call one, answer with only a JSON object "
        f"{CALL_FORMAT}; otherwise answer normally.",
    ]
    for t in tools:
        spec = {"name": t["name"], "description": t.get("description", ""), "parameters": t.get("parameters", {})}
        lines.append(json.dumps(spec, ensure_ascii=False))
    return "\n".join(lines)


def _call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": t["name"]}, "arguments": t.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    return alternatives[0] if len(alternatives) == 1 else {"oneOf": alternatives}


def call_grammar(tools: list[dict[str, Any]], choice: str) -> str:
    """The grammar of an answer under `choice` (`required`, `auto`, or a function's name)."""
    try:
        if choice not in ("required", "auto"):
            named = next((t for t in tools if t["name"] == choice), None)
            if named is None:
                raise ToolChoiceError(f"tool_choice names {choice!r}, which is not among the tools")
            grammar = grammar_for("json_schema", named.get("parameters") or {"type": "object"})
        else:
            grammar = grammar_for("json_schema", _call_schema(tools))
    except SchemaError as exc:
        raise ToolChoiceError(str(exc)) from None
    assert grammar is not None
    if choice != "auto":
        return grammar
    call = re.sub(r"^root ::=", "call ::=", grammar, count=1, flags=re.MULTILINE)
    return "root ::= call | text\ntext ::= [^{ \\t\\n] [^\\x00]*\n" + call


def parse_call(text: str, choice: str) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) of a generated call, or None when the answer is text (`auto`)."""
    stripped = text.strip()
    if choice not in ("required", "auto"):
        return choice, json.dumps(json.loads(stripped), ensure_ascii=False)
    if not stripped.startswith("{"):
        return None
    call = json.loads(stripped)
    return str(call["name"]), json.dumps(call["arguments"], ensure_ascii=False)


def call_id() -> str:
    """A new tool call id, as OpenAI's look."""
    return f"call_{uuid.uuid4().hex[:24]}"


def render_call(name: str, arguments: str) -> str:
    """How an earlier call reads in the conversation shown to the model."""
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def with_system(messages: list[dict[str, str]], context: str) -> list[dict[str, str]]:
    """`messages` with `context` (memories, tools) at the end of the system prompt (a system message first if none)."""
    if not context:
        return messages
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0] | {"content": f"{messages[0]['content']}\n\n{context}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]
