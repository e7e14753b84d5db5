"""OpenAI tool calls: the functions shown to the model, and a call generated under a llama.cpp grammar, so that when the
model calls, the call parses and its arguments follow the function's JSON Schema.

Where the GGUF's chat template renders `tools` (ToolFormat.template), the model reads them as it was trained to:
the template gets the functions, and calls are written in the template's own wrapping where it has one (Hermes-style
`<tool_call>...</tool_call>`, used by Qwen 2.5 and many fine-tunes). Otherwise (the embedded SmolLM2's template has
no tools) the functions are listed in the system prompt. Either way:
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

from node.inference.models import PLAIN, ToolFormat
from node.inference.structured import SchemaError, grammar_for

CALL_FORMAT = '{"name": <function name>, "arguments": <JSON object>}'


def openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """{name, description, parameters} as OpenAI's `tools` entries (what a chat template expects)."""
    return [{"type": "function", "function": t} for t in tools]


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


def _literal(text: str) -> str:
    return json.dumps(text)  # a GBNF string literal: JSON's escapes are GBNF's


def call_grammar(tools: list[dict[str, Any]], choice: str, fmt: ToolFormat = PLAIN) -> str:
    """The grammar of an answer under `choice` (`required`, `auto`, or a function's name; a named call is its
    arguments alone, whatever the format)."""
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
    if choice not in ("required", "auto"):
        return grammar
    obj = re.sub(r"^root ::=", "call-object ::=", grammar, count=1, flags=re.MULTILINE)
    wrapped = f"{_literal(fmt.open)} call-object {_literal(fmt.close)}" if fmt.open else "call-object"
    call = f"call ::= {wrapped}\n"
    if choice == "required":
        return "root ::= call\n" + call + obj
    excluded = "{" + ("<" if fmt.open else "")
    return f"root ::= call | text\ntext ::= [^{excluded} \\t\\n] [^\\x00]*\n" + call + obj


def parse_call(text: str, choice: str, fmt: ToolFormat = PLAIN) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) of a generated call, or None when the answer is text (`auto`)."""
    stripped = text.strip()
    if choice not in ("required", "auto"):
        return choice, json.dumps(json.loads(stripped), ensure_ascii=False)
    if not stripped.startswith(fmt.first_char()):
        return None
    if fmt.open:
        if not (stripped.startswith(fmt.open.strip()) and stripped.endswith(fmt.close.strip())):
            raise ValueError("a call without its closing tag")
        stripped = stripped[len(fmt.open.strip()) : -len(fmt.close.strip())].strip()
    call = json.loads(stripped)
    return str(call["name"]), json.dumps(call["arguments"], ensure_ascii=False)


def call_id() -> str:
    """A new tool call id, as OpenAI's look."""
    return f"call_{uuid.uuid4().hex[:24]}"


def render_call(name: str, arguments: str, fmt: ToolFormat = PLAIN) -> str:
    """How an earlier call reads in the conversation shown to the model."""
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments
    return fmt.open + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + fmt.close


def tool_prompt(
    messages: list[dict[str, str]], tools: list[dict[str, Any]], fmt: ToolFormat
) -> tuple[list[dict[str, str]], list[dict[str, Any]] | None]:
    """The messages and the `tools` for the chat template: the template's own rendering where it has one, else the
    system-prompt block (and no template tools)."""
    if fmt.template:
        return messages, openai_tools(tools)
    return with_system(messages, tools_prompt(tools)), None


def with_system(messages: list[dict[str, str]], context: str) -> list[dict[str, str]]:
    """`messages` with `context` (memories, tools) at the end of the system prompt (a system message first if none)."""
    if not context:
        return messages
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0] | {"content": f"{messages[0]['content']}\n\n{context}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]
