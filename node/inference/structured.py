"""Structured outputs: OpenAI's `response_format` as a llama.cpp grammar, so an answer parses (and follows its schema).

`json_object`: llama.cpp's JSON grammar (any JSON value whose top level is an object). `json_schema`: the schema
converted to GBNF by llama-cpp-python's port of llama.cpp's json-schema-to-grammar (types, required and optional
properties, enums, consts, string/array lengths, numeric formats, local `$ref`s); a schema it cannot convert is
refused, never ignored. An answer cut by `max_tokens` (finish_reason "length") can still be incomplete JSON.
"""

import json
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


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
