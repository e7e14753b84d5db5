"""The tool table (node.tools.registry) and tool definitions from Python signatures (node.tools.signature,
node.tools.loader): schemas, argument checks, refusals, time limits on the user's code."""

import asyncio
import time
from pathlib import Path
from typing import Any, Literal

import pytest
import trio

from node.tools.loader import load_folder
from node.tools.registry import MAX_RESULT_CHARS, Tool, ToolReason, ToolRefused, ToolRegistry
from node.tools.signature import SignatureError, signature_of
from node.tools.userland import UserCodeTimeout, run_user_code


async def _echo(arguments: dict[str, Any]) -> Any:
    return arguments


def _tool(name: str = "echo", parameters: dict[str, Any] | None = None) -> Tool:
    schema = parameters or {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    return Tool(name, "Echo.", schema, "builtin", _echo)


def test_a_signature_gives_the_schema_and_converts_arguments() -> None:
    # Arrange
    def convert(amount: float, currency: Literal["EUR", "USD"], rounded: bool = False) -> str:
        """Convert money.

        :param amount: how much
        :param currency: into which currency
        """
        return ""

    # Act
    sig = signature_of(convert)
    # Assert
    assert sig.description == "Convert money."
    assert sig.parameters == {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "amount": {"type": "number", "description": "how much"},
            "currency": {"type": "string", "enum": ["EUR", "USD"], "description": "into which currency"},
            "rounded": {"type": "boolean", "default": False},
        },
        "required": ["amount", "currency"],
    }
    assert sig.arguments({"amount": 3, "currency": "EUR"}) == {"amount": 3.0, "currency": "EUR", "rounded": False}
    with pytest.raises(ValueError):
        sig.arguments({"amount": 3, "currency": "GBP"})


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("def f(x):\n    '''Doc.'''", "no type hint"),
        ("def f(*xs: int):\n    '''Doc.'''", "*xs"),
        ("def f(x: int):\n    pass", "description"),
    ],
)
def test_functions_that_cannot_be_described_are_refused(source: str, words: str) -> None:
    # Arrange
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    # Act / Assert
    with pytest.raises(SignatureError, match=words.replace("*", r"\*")):
        signature_of(namespace["f"])


def test_the_registry_checks_arguments_and_refuses_bad_definitions() -> None:
    # Arrange
    registry = ToolRegistry()
    registry.add(_tool())

    async def calls() -> list[Any]:
        out: list[Any] = [await registry.call("echo", '{"n": 2}')]
        for name, args in (("echo", '{"n": "two"}'), ("echo", "[1]"), ("echo", "{bad"), ("nope", "{}")):
            with pytest.raises(ToolRefused) as refused:
                await registry.call(name, args)
            out.append(refused.value.reason)
        return out

    # Act
    results = trio.run(calls)
    # Assert
    assert results == [
        '{"n": 2}',
        ToolReason.INVALID_ARGUMENTS,
        ToolReason.INVALID_ARGUMENTS,
        ToolReason.INVALID_ARGUMENTS,
        ToolReason.UNKNOWN,
    ]
    broken = Tool("broken", "Bad $ref.", {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, "mcp:x", _echo)
    registry.add(broken)  # a valid schema document, which cannot be applied

    async def call_broken() -> str:
        with pytest.raises(ToolRefused) as refused:
            await registry.call("broken", {"a": 1})
        return str(refused.value.reason)

    assert trio.run(call_broken) == ToolReason.INVALID_TOOL
    for bad in (
        _tool("echo"),
        _tool("has space"),
        _tool("x", {"type": "array"}),
        _tool("y", {"type": "object", "properties": 3}),
    ):
        with pytest.raises(ToolRefused) as refused:
            registry.add(bad)
        assert refused.value.reason == ToolReason.INVALID_TOOL


def test_a_failing_tool_is_a_refusal_and_long_results_are_cut() -> None:
    # Arrange
    async def boom(arguments: dict[str, Any]) -> Any:
        raise OSError("disk on fire")

    async def chatty(arguments: dict[str, Any]) -> Any:
        return "x" * (MAX_RESULT_CHARS * 2)

    registry = ToolRegistry()
    registry.add(Tool("boom", "Fails.", {"type": "object"}, "builtin", boom))
    registry.add(Tool("chatty", "Talks.", {"type": "object"}, "builtin", chatty))

    async def calls() -> tuple[str, str]:
        with pytest.raises(ToolRefused) as refused:
            await registry.call("boom", {})
        return refused.value.detail, await registry.call("chatty", {})

    # Act
    detail, text = trio.run(calls)
    # Assert
    assert detail == "boom: OSError: disk on fire"
    assert len(text) < MAX_RESULT_CHARS + 100 and text.endswith(f"the result had {MAX_RESULT_CHARS * 2} characters]")


def test_user_code_past_its_time_is_cancelled_or_abandoned_without_holding_the_loop() -> None:
    # Arrange
    async def sleeps() -> str:
        await asyncio.sleep(60)
        return "late"

    def blocks() -> str:
        time.sleep(3)
        return "late"

    async def scenario() -> list[str]:
        messages = []
        for fn in (sleeps, blocks):
            started = time.monotonic()
            with pytest.raises(UserCodeTimeout) as timed_out:
                await run_user_code(fn, (), {}, 0.3)
            assert time.monotonic() - started < 2.0
            messages.append(str(timed_out.value))
        return messages

    # Act
    cancelled, abandoned = trio.run(scenario)
    # Assert
    assert "was cancelled" in cancelled and "abandoned" in abandoned


def test_a_folder_of_user_tools_loads_what_it_can_and_reports_the_rest(tmp_path: Path) -> None:
    # Arrange
    (tmp_path / "good.py").write_text(
        "import mirador\nfrom math import sqrt\n\n@mirador.tool\ndef root(x: float) -> float:\n"
        "    '''Square root.'''\n    return sqrt(x)\n"
    )
    (tmp_path / "crash.py").write_text("raise SystemExit('no')\n")
    (tmp_path / "_private.py").write_text("raise RuntimeError('never imported')\n")
    # Act
    loaded = load_folder(tmp_path, "tools")

    async def call() -> Any:
        return await loaded.tools[0].run({"x": 9})

    # Assert
    assert [t.name for t in loaded.tools] == ["root"] and loaded.tools[0].origin == "user:tools/good.py"
    assert trio.run(call) == 3.0
    (error,) = loaded.errors
    assert error[0].endswith("crash.py") and "SystemExit: no" in error[1]
