"""Tools the node runs itself (node.tools): the loop that feeds results back and streams the answer with its tool
events, the built-ins (run_python and calculate in the bubblewrap sandbox), the user's `@mirador.tool` files, and
/v1/tools — on a real daemon, through the real `openai` client."""

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from node.adapters.check import base_dims_of_file
from node.adapters.store import AdapterStore
from node.inference.models import embedded_model_path
from tests.daemon_harness import Daemon, run_cli, running
from tests.lora_files import write_adapter

PRIMES = textwrap.dedent(
    """
    primes, n = [], 2
    while len(primes) < 1000:
        if all(n % p for p in primes if p * p <= n):
            primes.append(n)
        n += 1
    print(sum(primes))
    """
)

USER_TOOLS = '''
import asyncio
import mirador


@mirador.tool(description="How many days until a date, counted from a fixed day.")
async def days_until(month: int, day: int, year: int = 2027) -> int:
    """Ignored: the decorator's description wins.

    Args:
        month: the month, 1-12
        day: the day of the month
    """
    import datetime

    return (datetime.date(year, month, day) - datetime.date(2026, 12, 5)).days


@mirador.tool(timeout_s=0.5)
async def stalls(seconds: float) -> str:
    """Sleeps, to show the node's time limit on user code."""
    await asyncio.sleep(seconds)
    return "woke"
'''


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("tools") / "home"
    (home / "tools").mkdir(parents=True)
    (home / "tools" / "dates.py").write_text(USER_TOOLS)
    (home / "tools" / "broken.py").write_text(
        "import mirador\n\n@mirador.tool\nasync def untyped(x):\n    '''No hints.'''\n"
    )
    dims = base_dims_of_file(embedded_model_path())
    AdapterStore(home / "adapters", dims).install("mathy", write_adapter(home.parent / "mathy.gguf", dims, std=0.001))
    (home / "personalities.toml").write_text(
        '[personalities.mathematician]\nbase = "base"\nadapter = "mathy"\nload_on = ["integral"]\n'
        'tools = ["calculate"]\n'
    )
    yield from running(home)


@pytest.fixture(scope="module")
def client(node: Daemon) -> OpenAI:
    token = (node.home / "api.token").read_text().strip()
    return OpenAI(base_url=f"{node.url}/v1", api_key=token, max_retries=0, timeout=120)


def call_message(name: str, arguments: dict[str, Any], call_id: str = "call_client_1") -> dict[str, Any]:
    """An assistant message that calls a node tool (the client decided the call)."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def test_the_node_runs_python_in_the_sandbox_and_streams_the_answer_with_the_tool_events(client: OpenAI) -> None:
    # Arrange: the conversation ends with a call of run_python that the node must make
    messages = [
        {"role": "user", "content": "What is the sum of the first 1000 primes?"},
        call_message("run_python", {"code": PRIMES}),
    ]
    # Act
    stream = client.chat.completions.create(
        model="base",
        messages=messages,  # type: ignore[arg-type]
        extra_body={"node_tools": ["run_python"]},
        stream=True,
        max_tokens=40,
        temperature=0,
    )
    chunks = list(stream)
    # Assert: the call and its exact result arrive as events, then the answer streams as content
    events = [c.model_extra["tool_event"] for c in chunks if c.model_extra and "tool_event" in c.model_extra]
    assert [e["type"] for e in events] == ["call", "result"]
    assert events[0]["name"] == "run_python" and json.loads(events[0]["arguments"])["code"] == PRIMES
    assert events[1]["content"] == "3682913" and events[1]["error"] is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.strip() and finishes in (["stop"], ["length"])
    first_content = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content)
    last_event = max(i for i, c in enumerate(chunks) if c.model_extra and "tool_event" in c.model_extra)
    assert last_event < first_content


def test_calculate_integrates_exactly_and_the_whole_answer_lists_the_events(client: OpenAI) -> None:
    # Arrange
    messages = [
        {"role": "user", "content": "What is the integral of x^2 from 0 to 3?"},
        call_message("calculate", {"expression": "integrate(x**2, (x, 0, 3))"}),
    ]
    # Act
    reply = client.chat.completions.create(
        model="base",
        messages=messages,  # type: ignore[arg-type]
        extra_body={"node_tools": ["calculate"]},
        max_tokens=30,
        temperature=0,
    )
    # Assert
    events = (reply.model_extra or {})["tool_events"]
    assert [e["type"] for e in events] == ["call", "result"]
    assert json.loads(events[1]["content"]) == {"result": "9"}
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens > 0


def test_a_call_the_model_makes_follows_the_schema_and_its_result_goes_back_to_the_model(client: OpenAI) -> None:
    # Act: the model must call calculate (named tool_choice); whatever it writes is run and answered
    reply = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "Compute 2**64 with the calculator."}],
        extra_body={"node_tools": ["calculate", "run_python"]},
        tool_choice={"type": "function", "function": {"name": "calculate"}},
        max_tokens=40,
        temperature=0,
    )
    # Assert
    events = (reply.model_extra or {})["tool_events"]
    call, result = events[0], events[1]
    assert call["type"] == "call" and call["name"] == "calculate"
    arguments = json.loads(call["arguments"])
    assert set(arguments) == {"expression"} and isinstance(arguments["expression"], str)
    assert result["type"] == "result" and result["id"] == call["id"] and result["content"]
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_node_tools_need_the_api_token_and_must_exist(node: Daemon) -> None:
    # Arrange
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    url = f"{node.url}/v1/chat/completions"
    # Act
    anonymous = httpx.post(url, json=body | {"node_tools": ["run_python"]}, timeout=60)
    unknown = httpx.post(url, json=body | {"node_tools": ["rm_rf"]}, headers=node.auth, timeout=60)
    both = httpx.post(
        url,
        json=body | {"node_tools": ["calculate"], "tools": [{"type": "function", "function": {"name": "f"}}]},
        headers=node.auth,
        timeout=60,
    )
    # Assert
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert unknown.status_code == 400 and "rm_rf" in unknown.json()["error"]["message"]
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]


def test_user_tools_load_with_a_schema_from_their_signature_and_run_bounded(node: Daemon) -> None:
    # Act
    listing = httpx.get(f"{node.url}/v1/tools", headers=node.auth, timeout=30).json()
    ran = httpx.post(
        f"{node.url}/v1/tools/days_until", json={"arguments": {"month": 1, "day": 1}}, headers=node.auth, timeout=30
    )
    wrong = httpx.post(
        f"{node.url}/v1/tools/days_until", json={"arguments": {"month": "May"}}, headers=node.auth, timeout=30
    )
    stalled = httpx.post(
        f"{node.url}/v1/tools/stalls", json={"arguments": {"seconds": 30}}, headers=node.auth, timeout=30
    )
    # Assert
    tools = {t["name"]: t for t in listing["tools"]}
    assert {"run_python", "calculate", "search_docs", "days_until", "stalls"} <= set(tools)
    days = tools["days_until"]
    assert days["origin"] == "user:tools/dates.py" and days["description"].startswith("How many days")
    assert days["parameters"]["required"] == ["month", "day"]
    assert days["parameters"]["properties"]["month"] == {"type": "integer", "description": "the month, 1-12"}
    assert days["parameters"]["properties"]["year"]["default"] == 2027
    assert ran.status_code == 200 and ran.json()["content"] == "27"
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "invalid_arguments"
    assert stalled.status_code == 504 and stalled.json()["error"]["code"] == "tool_timeout"
    (error,) = listing["errors"]
    assert error["where"].endswith("broken.py") and "no type hint" in error["error"]


def test_a_personality_runs_its_own_tools_and_lists_them(node: Daemon, client: OpenAI) -> None:
    # Arrange: routed by its keyword, the personality's calculate is a node tool without naming it in the request
    messages = [
        {"role": "user", "content": "The integral of 1/x from 1 to e?"},
        call_message("calculate", {"expression": "integrate(1/x, (x, 1, E))"}),
    ]
    # Act
    reply = client.chat.completions.create(model="auto", messages=messages, max_tokens=20, temperature=0)  # type: ignore[arg-type]
    models = httpx.get(f"{node.url}/v1/models", timeout=10).json()["data"]
    anonymous = httpx.post(
        f"{node.url}/v1/chat/completions",
        json={"model": "mathematician", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=30,
    )
    # Assert
    extra = reply.model_extra or {}
    assert extra["personality"] == "mathematician"
    assert json.loads(extra["tool_events"][1]["content"]) == {"result": "1"}
    (listed,) = [m for m in models if m["id"] == "mathematician"]
    assert listed["personality"]["tools"] == ["calculate"]
    assert anonymous.status_code == 401


def test_the_chat_command_sends_node_tools(node: Daemon) -> None:
    # Act
    unknown = run_cli(node.home, node.port, "chat", "--tools", "calculate,nope", "--max-tokens", "4", "hi")
    known = run_cli(node.home, node.port, "chat", "--tools", "calculate", "--max-tokens", "4", "hi")
    # Assert
    assert unknown.returncode == 1 and "no tool named 'nope'" in unknown.stderr
    assert known.returncode == 0, known.stderr
