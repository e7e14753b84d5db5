"""A model whose chat template renders tools (Hermes-style `<tool_call>` tags, as Qwen 2.5's): the tools reach the
model through its own template, calls are generated inside the template's tags and parsed back to OpenAI's
`tool_calls`. The model is the embedded SmolLM2 with such a template written into a copy of its GGUF."""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from node.inference.models import BaseModel, ToolFormat, embedded_model_path
from tests.daemon_harness import Daemon, running

HERMES = """\
{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}

# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}{% if message['role'] != 'system' %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif %}{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def hermes_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hermes") / "smollm2-hermes.gguf"
    files = [str(embedded_model_path()), str(out)]
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--chat-template", HERMES, "--force", *files],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def node(hermes_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from running(tmp_path_factory.mktemp("hermes-node") / "home", {"MIRADOR_MODEL_PATH": str(hermes_gguf)})


def text_of(model: BaseModel, tokens: list[int]) -> str:
    return b"".join(model.llama.piece(t, special=True) for t in tokens).decode()


def test_the_template_renders_the_tools_and_its_tags_are_recognised(hermes_gguf: Path) -> None:
    # Arrange
    model = BaseModel("hermes", hermes_gguf, extra_buffers=False)
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    try:
        # Act
        with_tools = text_of(model, model.chat_tokens(messages, [{"type": "function", "function": WEATHER}]))
        without = text_of(model, model.chat_tokens(messages))
        fmt = model.tool_format
    finally:
        model.close()
    # Assert
    assert fmt == ToolFormat(True, "<tool_call>\n", "\n</tool_call>")
    assert '"name": "get_weather"' in with_tools and "<tools>" in with_tools
    assert "<tools>" not in without


def test_a_required_call_is_written_in_the_templates_tags_and_comes_back_as_tool_calls(node: Daemon) -> None:
    # Arrange
    client = OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=60)
    args: dict[str, Any] = {
        "model": "base",
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
        "tools": [{"type": "function", "function": WEATHER}],
        "tool_choice": "required",
        "max_tokens": 60,
        "temperature": 0,
    }
    # Act
    whole = client.chat.completions.create(**args)
    streamed = list(client.chat.completions.create(**args, stream=True))
    # Assert
    (call,) = whole.choices[0].message.tool_calls or []
    assert whole.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    deltas = [c.choices[0].delta for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    (streamed_call,) = deltas[0].tool_calls or []
    assert streamed_call.function is not None and streamed_call.function.arguments == call.function.arguments
