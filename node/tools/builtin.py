"""The node's built-in tools: `search_docs` (memory), `run_python` and `calculate` (Sympy), the last two only ever in
the sandbox: the code and the expressions come from a model, which reads whatever a chat or a document put before it.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from node.memory.record import DEFAULT_NAMESPACE, MemoryRefused, check_namespace
from node.memory.service import MemoryService
from node.tools.registry import Tool, ToolReason, ToolRefused
from node.tools.sandbox import Outcome, Sandbox, SandboxRefused

# Sympy in the sandbox: the expression arrives on stdin (never inside the code), parse_expr with ^ as power and
# implicit multiplication; the answer is the exact result, and a decimal one when that differs.
CALCULATE = r"""
import json, sys
import sympy
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
    standard_transformations)
text = sys.stdin.read()
names = {n: getattr(sympy, n) for n in dir(sympy) if not n.startswith("_")}
names.update({c: sympy.Symbol(c) for c in "abcdefghjkmnpqrstuvwxyz"})
names.update(E=sympy.E, I=sympy.I, pi=sympy.pi, oo=sympy.oo)
value = parse_expr(text, local_dict=names, transformations=standard_transformations
                   + (implicit_multiplication_application, convert_xor))
if isinstance(value, sympy.Basic) and not isinstance(value, (sympy.Symbol, sympy.Number)):
    value = sympy.simplify(value.doit())
answer = {"result": str(value)}
if getattr(value, "is_number", False) and not getattr(value, "is_Integer", False):
    try:
        answer["decimal"] = str(sympy.N(value, 15))
    except Exception:
        pass
print(json.dumps(answer))
"""

RUN_PYTHON_DESCRIPTION = (
    "Run Python 3 code in a sandbox (no network, no files but a scratch folder, limited time and memory) and get "
    "what it prints. Use print() for the answer."
)
CALCULATE_DESCRIPTION = (
    "Exact math with Sympy: arithmetic, algebra and calculus, e.g. '2**100', 'factor(x**2 - 1)', "
    "'solve(x**2 - 4, x)', 'diff(sin(x)*x, x)', 'integrate(x**2, (x, 0, 3))'."
)
SEARCH_DESCRIPTION = "Search the user's memory (documents, notes, earlier chats) and get the closest passages."


def outcome_text(outcome: Outcome) -> str:
    """What the model reads of a sandboxed run: its output, and how it ended when it did not end well."""
    parts = [outcome.stdout.rstrip("\n")]
    if outcome.stderr.strip():
        parts.append("[stderr]\n" + outcome.stderr.rstrip("\n"))
    if outcome.truncated:
        parts.append("[the output was cut: too long]")
    if outcome.ended == "exit" and outcome.exit_code not in (0, None):
        parts.append(f"[exit status {outcome.exit_code}]")
    elif outcome.ended != "exit":
        parts.append(f"[stopped: {outcome.ended.replace('_', ' ')} limit]" if outcome.ended != "signal" else "[killed]")
    return "\n".join(p for p in parts if p) or "[no output]"


def _sandboxed(sandbox: Sandbox, scratch: Path | None) -> Callable[[str, bytes], Any]:
    async def run(code: str, stdin: bytes) -> Outcome:
        try:
            return await sandbox.run_python(code, stdin=stdin, scratch=scratch)
        except SandboxRefused as exc:
            raise ToolRefused(ToolReason.UNAVAILABLE, exc.detail) from None

    return run


def run_python_tool(sandbox: Sandbox, scratch: Path | None) -> Tool:
    """`run_python(code)`: the code's output, run in the sandbox."""
    sandboxed = _sandboxed(sandbox, scratch)

    async def run(arguments: dict[str, Any]) -> str:
        return outcome_text(await sandboxed(arguments["code"], b""))

    parameters = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "Python 3 source; print() the answer"}},
        "required": ["code"],
        "additionalProperties": False,
    }
    return Tool("run_python", RUN_PYTHON_DESCRIPTION, parameters, "builtin", run)


def calculate_tool(sandbox: Sandbox) -> Tool:
    """`calculate(expression)`: Sympy's exact answer (and a decimal one), evaluated in the sandbox."""
    sandboxed = _sandboxed(sandbox, None)

    async def run(arguments: dict[str, Any]) -> Any:
        outcome = await sandboxed(CALCULATE, arguments["expression"].encode())
        if outcome.ok():
            try:
                return json.loads(outcome.stdout)
            except ValueError:
                pass
        last = (outcome.stderr.strip().splitlines() or [outcome.ended])[-1]
        raise ToolRefused(ToolReason.FAILED, f"calculate: {last}")

    parameters = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "a Sympy expression", "maxLength": 2000}},
        "required": ["expression"],
        "additionalProperties": False,
    }
    return Tool("calculate", CALCULATE_DESCRIPTION, parameters, "builtin", run)


def search_docs_tool(memory: MemoryService) -> Tool:
    """`search_docs(query, k, namespace)`: the memory's closest passages with their sources."""

    async def run(arguments: dict[str, Any]) -> Any:
        namespace = arguments.get("namespace", DEFAULT_NAMESPACE)
        try:
            check_namespace(namespace)
            hits = await trio.to_thread.run_sync(memory.search, namespace, arguments["query"], arguments.get("k", 5))
        except MemoryRefused as exc:
            raise ToolRefused(ToolReason.FAILED, f"search_docs: {exc.detail}") from None
        return [{"text": h.memory.text, "source": h.memory.source, "score": round(h.score, 4)} for h in hits]

    parameters = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to look for", "maxLength": 2000},
            "k": {"type": "integer", "minimum": 1, "maximum": 20, "default": 5},
            "namespace": {"type": "string", "default": DEFAULT_NAMESPACE},
        },
        "required": ["query"],
        "additionalProperties": False,
    }
    return Tool("search_docs", SEARCH_DESCRIPTION, parameters, "builtin", run)
