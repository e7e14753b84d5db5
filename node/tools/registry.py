"""The node's tools: one table of name -> Tool (built-ins, the user's `@mirador.tool` functions, MCP servers' tools),
arguments checked against each tool's JSON Schema before it runs, every failure a `ToolRefused`."""

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import jsonschema

from crypto.refusal import Refused

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_RESULT_CHARS = 16_000  # what a tool's answer may add to a conversation


class ToolReason(StrEnum):
    """Why a tool call was refused."""

    UNKNOWN = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"
    FAILED = "tool_failed"
    TIMEOUT = "tool_timeout"
    UNAVAILABLE = "tool_unavailable"  # e.g. the sandbox cannot start on this machine
    INVALID_TOOL = "invalid_tool"  # a tool definition that cannot be offered (name, schema, duplicate)


class ToolRefused(Refused):
    """A tool call (or definition) refused: `reason` is a ToolReason."""

    REASONS = ToolReason


Runner = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    """A tool the node can run: `run` gets arguments that already validate against `parameters`."""

    name: str
    description: str
    parameters: dict[str, Any]
    origin: str  # "builtin", "user:<file>", "mcp:<server>"
    run: Runner

    def spec(self) -> dict[str, Any]:
        """The tool as an OpenAI `tools` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def check_definition(name: str, parameters: Any) -> None:
    """Refuse a tool whose name OpenAI clients would refuse or whose parameters are not an object schema."""
    if not NAME.fullmatch(name):
        raise ToolRefused(ToolReason.INVALID_TOOL, f"tool name {name!r}: use 1-64 letters, digits, '_' or '-'")
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ToolRefused(ToolReason.INVALID_TOOL, f"tool {name}: its parameters must be a JSON Schema object")
    try:
        jsonschema.Draft202012Validator.check_schema(parameters)
    except jsonschema.SchemaError as exc:
        detail = f"tool {name}: its parameters' schema is invalid: {exc.message}"
        raise ToolRefused(ToolReason.INVALID_TOOL, detail) from None


def result_text(value: Any) -> str:
    """A tool's return value as the text the model reads (JSON unless it is text), cut at MAX_RESULT_CHARS."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"\n[... cut: the result had {len(text)} characters]"
    return text


class ToolRegistry:
    """Name -> Tool. The first tool of a name wins (built-ins are added first); a later one is refused and logged."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def add(self, tool: Tool) -> None:
        """Offer `tool`; ToolRefused(invalid_tool) when its definition is bad or its name is taken."""
        check_definition(tool.name, tool.parameters)
        if (taken := self._tools.get(tool.name)) is not None:
            raise ToolRefused(ToolReason.INVALID_TOOL, f"tool {tool.name} ({tool.origin}): {taken.origin} has it")
        self._tools[tool.name] = tool

    def remove_origin(self, prefix: str) -> None:
        """Drop every tool whose origin starts with `prefix` (a reloaded folder, a disconnected MCP server)."""
        self._tools = {n: t for n, t in self._tools.items() if not t.origin.startswith(prefix)}

    def get(self, name: str) -> Tool:
        """The tool called `name`; ToolRefused(unknown_tool) if none."""
        try:
            return self._tools[name]
        except KeyError:
            known = ", ".join(sorted(self._tools)) or "none"
            raise ToolRefused(ToolReason.UNKNOWN, f"no tool named {name!r} on this node (tools: {known})") from None

    def tools(self) -> list[Tool]:
        """Every tool, by name."""
        return [self._tools[n] for n in sorted(self._tools)]

    async def call(self, name: str, arguments: dict[str, Any] | str) -> str:
        """Run a tool on arguments (a dict or its JSON text) and return its result text; every failure is a
        ToolRefused (the arguments' schema is checked first)."""
        tool = self.get(name)
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError as exc:
                raise ToolRefused(ToolReason.INVALID_ARGUMENTS, f"{name}: arguments are not JSON ({exc})") from None
        if not isinstance(arguments, dict):
            raise ToolRefused(ToolReason.INVALID_ARGUMENTS, f"{name}: arguments must be a JSON object")
        try:
            errors = sorted(jsonschema.Draft202012Validator(tool.parameters).iter_errors(arguments), key=str)
        except Exception as exc:  # a schema jsonschema cannot apply (an unresolvable $ref): the tool's fault
            raise ToolRefused(ToolReason.INVALID_TOOL, f"{name}: its schema cannot be applied: {exc}") from None
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "arguments"
            raise ToolRefused(ToolReason.INVALID_ARGUMENTS, f"{name}: {where}: {errors[0].message}")
        try:
            return result_text(await tool.run(arguments))
        except ToolRefused:
            raise
        except Exception as exc:
            log.info("tool %s (%s) failed", name, tool.origin, exc_info=True)
            raise ToolRefused(ToolReason.FAILED, f"{name}: {type(exc).__name__}: {exc}") from None
