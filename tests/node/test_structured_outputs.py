"""Structured outputs through the real `openai` client: `response_format` is generated under a llama.cpp grammar,
so answers parse and follow their schema; what the node cannot honour is refused, never ignored."""

import json
from collections.abc import Callable
from typing import Any

import httpx
import llama_cpp as ll
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel

from node.inference.llama_backend import (
    BatchContext,
    GrammarError,
    LlamaModel,
    SamplingParams,
    free_sampler,
    make_sampler,
)
from node.inference.structured import grammar_for
from tests.daemon_harness import Daemon


class Person(BaseModel):
    name: str
    age: int


ASK = [{"role": "user", "content": "Invent a person: name and age."}]


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> OpenAI:
    return OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_parse_returns_an_object_of_the_pydantic_model(client: OpenAI) -> None:
    # Act
    reply = client.chat.completions.parse(
        model="base", messages=ASK, response_format=Person, max_tokens=60, temperature=0
    )
    # Assert
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person) and choice.message.parsed.name
    assert Person.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_a_streamed_schema_answer_assembles_into_the_same_json(client: OpenAI) -> None:
    # Arrange
    schema = {"type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema()}}
    request: Any = {"model": "base", "messages": ASK, "response_format": schema, "max_tokens": 60, "temperature": 0}
    # Act
    whole = client.chat.completions.create(**request)
    stream = client.chat.completions.create(**request, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # Assert
    assert text == whole.choices[0].message.content
    assert set(json.loads(text)) == {"name", "age"}


def test_json_object_mode_answers_a_json_object(client: OpenAI) -> None:
    # Act
    reply = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "Is the sky blue? Answer as JSON with the key 'answer'."}],
        response_format={"type": "json_object"},
        max_tokens=40,
        temperature=0,
    )
    # Assert
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "r", "schema": {"$ref": "http://x/y"}},
                }
            },
            "response_format",
        ),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_choice": "none", "logprobs": True}, "logprobs"),
    ],
)
def test_what_the_node_cannot_honour_is_refused(daemon: Daemon, extra: dict, param: str) -> None:
    # Act
    body = {"model": "base", "messages": ASK, "max_tokens": 4} | extra
    resp = httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=30)
    # Assert
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_the_openai_client_sees_a_refusal_as_a_bad_request(client: OpenAI) -> None:
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="base", messages=ASK, logit_bias={"1": 5})


def test_a_grammar_llama_cpp_cannot_parse_is_an_error_not_a_crash(llama: LlamaModel) -> None:
    # Act / Assert
    with pytest.raises(GrammarError):
        make_sampler(SamplingParams(temperature=0, grammar="root ::= ( unclosed"), llama.n_vocab, llama.vocab)
    free_sampler(make_sampler(SamplingParams(grammar=grammar_for("json_object")), llama.n_vocab, llama.vocab))


def greedy_tokens(llama: LlamaModel, prompt: str, sample: Callable[[BatchContext], int], limit: int = 48) -> list[int]:
    ctx = BatchContext(llama, 512, 1, 64, 2)
    try:
        tokens = llama.tokenize(prompt, True, True)
        for i, t in enumerate(tokens):
            ctx.add(t, i, 0, i == len(tokens) - 1)
        ctx.decode()
        out: list[int] = []
        while len(out) < limit:
            tok = sample(ctx)
            if llama.is_eog(tok):
                break
            out.append(tok)
            ctx.add(tok, len(tokens) + len(out) - 1, 0, True)
            ctx.decode()
        return out
    finally:
        ctx.close()


def test_the_grammar_fast_path_draws_what_the_grammar_first_path_draws(llama: LlamaModel) -> None:
    # Arrange: a chat prompt whose free answer does not start as JSON, so the fast path must also resample
    prompt = "<|im_start|>user\nDescribe a cat.<|im_end|>\n<|im_start|>assistant\n"
    grammar = grammar_for("json_schema", Person.model_json_schema())
    fast = make_sampler(SamplingParams(temperature=0, grammar=grammar), llama.n_vocab, llama.vocab)
    reference = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())  # grammar over every token
    ll.llama_sampler_chain_add(reference, ll.llama_sampler_init_grammar(llama.vocab, grammar.encode(), b"root"))
    ll.llama_sampler_chain_add(reference, ll.llama_sampler_init_greedy())
    # Act
    try:
        got = greedy_tokens(llama, prompt, lambda ctx: ctx.sample(fast, -1))
        expected = greedy_tokens(llama, prompt, lambda ctx: int(ll.llama_sampler_sample(reference, ctx.ctx, -1)))
    finally:
        free_sampler(fast)
        ll.llama_sampler_free(reference)
    # Assert
    assert got == expected
    assert fast.resampled > 0
    Person.model_validate_json(b"".join(llama.piece(t) for t in got).decode())
