"""Structured outputs: OpenAI's `response_format` as a llama.cpp grammar, so an answer parses (and follows its schema).

`json_object`: llama.cpp's JSON grammar (any JSON value whose top level is an object). `json_schema`: the schema
converted to GBNF by llama-cpp-python's port of llama.cpp's json-schema-to-grammar (types, required and optional
properties, enums, consts, string/array lengths, numeric formats, local `$ref`s); a schema it cannot convert is
refused, never ignored. An answer cut by `max_tokens` (finish_reason "length") can still be incomplete JSON.
"""

import json
from typing import Any

from llama_cpp import llama_grammar
from llama_cpp.llama_grammar import json_schema_to_gbnf

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def _repetition(
    item_rule: str,
    min_items: int,
    max_items: int | None,
    separator_rule: str | None = None,
    item_rule_is_literal: bool = False,
) -> str:
    """llama.cpp's current repetition rule (GBNF `x{m,n}`). llama-cpp-python's older port nests `(x (x (x)?)?)?` once
    per allowed item: a string with maxLength 2000 became a 16 kB rule that llama.cpp refuses to parse."""
    if max_items == 0:
        return ""
    if min_items == 0 and max_items == 1:
        return f"{item_rule}?"
    if not separator_rule:
        if min_items == 1 and max_items is None:
            return f"{item_rule}+"
        if min_items == 0 and max_items is None:
            return f"{item_rule}*"
        return f"{item_rule}{{{min_items},{max_items if max_items is not None else ''}}}"
    rest = _repetition(
        f"({separator_rule} {item_rule})", max(min_items - 1, 0), max_items - 1 if max_items is not None else None
    )
    result = f"{item_rule} {rest}"
    return f"({result})?" if min_items == 0 else result


llama_grammar._build_repetition = _repetition  # the converter looks it up at call time


class SchemaError(ValueError):
    """A JSON schema this node cannot turn into a grammar; the message says why."""


def grammar_for(kind: str, schema: dict[str, Any] | None = None) -> str | None:
    """The GBNF grammar of a response format: None for `text`."""
    if kind == "text":
        return None
    if kind == "json_object":
        schema = JSON_OBJECT_SCHEMA
    if schema is None:
        raise SchemaError("response_format json_schema needs json_schema.schema")
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises bare Exceptions, KeyErrors, ... on what it does not support
        raise SchemaError(f"this JSON schema cannot be enforced: {type(exc).__name__}: {exc}") from None
