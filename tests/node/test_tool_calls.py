"""OpenAI tool calls through the real `openai` client: a call, when made, parses and follows its function's schema
(generated under a llama.cpp grammar), streamed deltas assemble into the same call, and a `tool` message continues
the conversation."""

import json
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.daemon_harness import Daemon

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> OpenAI:
    return OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client: OpenAI, **extra: Any) -> Any:
    """A greedy chat with the weather question and the weather tool, unless `extra` says otherwise."""
    args: dict[str, Any] = {"model": "base", "messages": ASK, "tools": [WEATHER], "max_tokens": 60, "temperature": 0}
    return client.chat.completions.create(**(args | extra))


def valid_weather(arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit")
    return dict(args)


def test_a_named_tool_choice_yields_arguments_that_follow_the_schema(client: OpenAI) -> None:
    # Act
    reply = ask(client, tool_choice=NAMED)
    # Assert
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    valid_weather(call.function.arguments)


def test_streamed_call_deltas_assemble_into_the_same_call(client: OpenAI) -> None:
    # Arrange
    whole = ask(client, tool_choice=NAMED)
    # Act
    stream = ask(client, tool_choice=NAMED, stream=True)
    name, arguments, ids, reasons = "", "", set(), []
    for chunk in stream:
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                ids.add(d.id) if d.id else None
                name += d.function.name or "" if d.function else ""
                arguments += d.function.arguments or "" if d.function else ""
    # Assert
    (expected,) = whole.choices[0].message.tool_calls or []
    assert name == "get_weather" and len(ids) == 1
    assert arguments == expected.function.arguments
    assert reasons[-1] == "tool_calls"


def test_a_tool_message_continues_to_a_final_answer(client: OpenAI) -> None:
    # Arrange: the call, then its result
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    messages: Any = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees celsius, sunny"},
    ]
    # Act
    reply = ask(client, messages=messages, max_tokens=30)
    # Assert: the model answers (auto: text) and a well-formed answer comes back either way
    choice = reply.choices[0]
    if choice.finish_reason == "tool_calls":
        valid_weather((choice.message.tool_calls or [])[0].function.arguments)
    else:
        assert choice.message.content and choice.message.content.strip()


def test_required_calls_one_of_the_tools_with_valid_arguments(client: OpenAI) -> None:
    # Act
    reply = ask(client, tools=[WEATHER, TIME], tool_choice="required")
    # Assert
    (call,) = reply.choices[0].message.tool_calls or []
    assert reply.choices[0].finish_reason == "tool_calls"
    if call.function.name == "get_weather":
        valid_weather(call.function.arguments)
    else:
        assert call.function.name == "get_time" and isinstance(json.loads(call.function.arguments)["zone"], str)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, None),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ],
)
def test_tool_requests_the_node_cannot_honour_are_refused(daemon: Daemon, extra: dict, param: str | None) -> None:
    # Act
    resp = httpx.post(
        f"{daemon.url}/v1/chat/completions",
        json={"model": "base", "messages": ASK, "max_tokens": 4} | extra,
        timeout=30,
    )
    # Assert
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_a_call_cut_short_comes_back_as_the_text_it_is(client: OpenAI) -> None:
    # Act: a stop string cuts the arguments; max_tokens cuts a streamed call
    stopped = ask(client, tool_choice=NAMED, stop=['"'])
    stream = ask(client, tool_choice=NAMED, max_tokens=3, stream=True)
    reasons = [c.finish_reason for chunk in stream for c in chunk.choices]
    # Assert
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content is not None and '"' not in choice.message.content
    assert reasons[-1] == "length"


def test_a_plain_streamed_chat_keeps_its_own_finish_reason(client: OpenAI) -> None:
    # Arrange: the same greedy chat whole, then streamed (no tools)
    messages: Any = [{"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(model="base", messages=messages, max_tokens=64, temperature=0)
    # Act
    stream = client.chat.completions.create(model="base", messages=messages, max_tokens=64, temperature=0, stream=True)
    reasons = [c.finish_reason for chunk in stream for c in chunk.choices]
    # Assert
    assert reasons[-1] == whole.choices[0].finish_reason and reasons[-1] in ("stop", "length")
