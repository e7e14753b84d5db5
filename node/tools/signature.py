"""A Python function's tool definition from its signature and docstring: the description (the docstring's first
paragraph unless given), a JSON Schema of its parameters (pydantic, from the type hints; each parameter's words from
an `Args:` or `:param x:` line), and a validator that turns JSON arguments into the function's types."""

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

import pydantic


class SignatureError(ValueError):
    """A function that cannot be a tool (no type hint, *args, an untranslatable type)."""


@dataclass(frozen=True)
class Signature:
    """A function's tool definition."""

    description: str
    parameters: dict[str, Any]
    model: type[pydantic.BaseModel]

    def arguments(self, raw: dict[str, Any]) -> dict[str, Any]:
        """JSON arguments as the function's keyword arguments, in its types (pydantic.ValidationError if not)."""
        parsed = self.model.model_validate(raw)
        return {name: getattr(parsed, name) for name in type(parsed).model_fields}


_PARAM_LINE = re.compile(r"^\s*(?::param\s+)?(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)$")


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(first paragraph, {parameter: words}) of a Google-style (`Args:`) or reST (`:param x:`) docstring."""
    doc = inspect.cleandoc(doc)
    summary = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    params: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if in_args and stripped.endswith(":") and not line.startswith((" ", "\t")):
            in_args = False
        if (in_args or stripped.startswith(":param")) and (m := _PARAM_LINE.match(stripped)):
            params[m.group(1)] = m.group(2).strip()
    if summary.startswith((":param", "Args:")):
        summary = ""
    return summary, params


def _strip_titles(schema: Any) -> Any:
    """Pydantic's schema without its `title` keys (noise in the prompt the model reads)."""
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


def signature_of(fn: Callable[..., Any], description: str | None = None) -> Signature:
    """The tool definition of `fn`; SignatureError when a parameter has no type hint or is *args/**kwargs."""
    name = getattr(fn, "__name__", "tool")
    summary, words = _docstring_parts(fn.__doc__ or "")
    try:
        hints = get_type_hints(fn)
    except Exception as exc:
        raise SignatureError(f"{name}: its type hints cannot be read: {exc}") from None
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise SignatureError(f"{name}: *{param.name} cannot be described to a model; name every parameter")
        if param.name not in hints:
            raise SignatureError(f"{name}: the parameter {param.name!r} has no type hint")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hints[param.name], pydantic.Field(default, description=words.get(param.name)))
    try:
        model = pydantic.create_model(f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"), **fields)
        schema = _strip_titles(model.model_json_schema())
    except Exception as exc:
        raise SignatureError(f"{name}: its parameters have no JSON Schema: {exc}") from None
    text = description if description is not None else summary
    if not text:
        raise SignatureError(f"{name}: give it a description (the decorator's description= or a docstring)")
    return Signature(text, schema, model)
