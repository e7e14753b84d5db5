"""The official `openai` client against a real daemon process on 127.0.0.1."""

import httpx
import pytest
from llama_cpp import Llama
from openai import OpenAI

from node.inference.models import embedded_model_path
from tests.daemon_harness import Daemon

QUESTION = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> OpenAI:
    return OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference_vocab() -> Llama:
    """llama.cpp's own high-level tokenizer on the same GGUF, for independent token counts."""
    return Llama(str(embedded_model_path()), vocab_only=True, verbose=False)


def chatml_prompt_tokens(vocab: Llama, question: str) -> int:
    # SmolLM2-Instruct's template (ChatML with a default system prompt), written out by hand.
    text = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    return len(vocab.tokenize(text.encode(), add_bos=False, special=True))


def test_models_lists_the_embedded_model(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2-135m-instruct"]


def test_non_streamed_chat_has_text_and_correct_usage(client: OpenAI, reference_vocab: Llama) -> None:
    # Arrange
    expected_prompt = chatml_prompt_tokens(reference_vocab, QUESTION)
    # Act
    resp = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
    )
    # Assert
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == expected_prompt
    assert 1 <= resp.usage.completion_tokens <= 12
    if choice.finish_reason == "length":
        assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_chat_matches_non_streamed_and_reports_usage(client: OpenAI, reference_vocab: Llama) -> None:
    # Arrange
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="base", messages=messages, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    # Act
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=messages,
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    # Assert
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert text.strip()
    assert text == whole.choices[0].message.content  # greedy decoding: streamed and whole answers agree
    assert finishes == [whole.choices[0].finish_reason]
    assert usage is not None and chunks[-1].choices == []
    assert usage.prompt_tokens == chatml_prompt_tokens(reference_vocab, QUESTION)
    assert usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) <= usage.completion_tokens  # one chunk per token at most (UTF-8 may merge)


def test_text_completion_streamed_and_not(client: OpenAI, reference_vocab: Llama) -> None:
    prompt = "The three primary colours are"
    expected_prompt = len(reference_vocab.tokenize(prompt.encode(), add_bos=True))
    whole = client.completions.create(model="base", prompt=prompt, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="base", prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert whole.choices[0].text.strip()
    assert whole.usage is not None and whole.usage.prompt_tokens == expected_prompt
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_stop_string_ends_the_answer_before_it(client: OpenAI) -> None:
    prompt = "Count: 1, 2, 3, 4, 5, 6, 7, 8"
    free = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0)
    text = free.choices[0].text
    assert len(text) > 3
    stop = text[2:4]  # a string that greedy decoding will produce
    cut = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_health_and_node_status(daemon: Daemon) -> None:
    assert httpx.get(f"{daemon.url}/health").json()["status"] == "ok"
    status = httpx.get(f"{daemon.url}/v1/node/status").json()
    assert status["profile"]["name"] == "balanced"
    assert status["model"]["id"] == "smollm2-135m-instruct"
    assert status["node"]["identity"].startswith("ed25519:")
