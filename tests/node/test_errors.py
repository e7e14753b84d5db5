"""Bad input gets the right 4xx with an OpenAI-style error naming the problem, and the daemon keeps answering."""

from typing import Any

import httpx
import pytest

from tests.daemon_harness import Daemon

MSG = [{"role": "user", "content": "Hi"}]
LONG_TEXT = "word " * 3000  # > 2048 tokens (the balanced profile's context)

CASES: list[tuple[str, str, Any, int, str]] = [
    # (case id, path, body (bytes = raw), expected status, a word the message or param must contain)
    ("malformed-json", "/v1/chat/completions", b'{"model": "base", "messages": [', 400, "malformed JSON"),
    ("not-an-object", "/v1/chat/completions", b"[1, 2, 3]", 400, "JSON object"),
    ("empty-body", "/v1/chat/completions", b"", 400, "empty"),
    ("unknown-model", "/v1/chat/completions", {"model": "gpt-9", "messages": MSG}, 404, "gpt-9"),
    ("missing-messages", "/v1/chat/completions", {"model": "base"}, 400, "messages"),
    ("empty-messages", "/v1/chat/completions", {"model": "base", "messages": []}, 400, "messages"),
    ("messages-wrong-type", "/v1/chat/completions", {"model": "base", "messages": "hello"}, 400, "messages"),
    (
        "bad-role",
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "king", "content": "x"}]},
        400,
        "role",
    ),
    (
        "negative-max-tokens",
        "/v1/chat/completions",
        {"model": "base", "messages": MSG, "max_tokens": -5},
        400,
        "max_tokens",
    ),
    (
        "max-tokens-string",
        "/v1/chat/completions",
        {"model": "base", "messages": MSG, "max_tokens": "ten"},
        400,
        "max_tokens",
    ),
    (
        "temperature-wrong-type",
        "/v1/chat/completions",
        {"model": "base", "messages": MSG, "temperature": "hot"},
        400,
        "temperature",
    ),
    (
        "temperature-out-of-range",
        "/v1/chat/completions",
        {"model": "base", "messages": MSG, "temperature": 9},
        400,
        "temperature",
    ),
    ("stream-wrong-type", "/v1/chat/completions", {"model": "base", "messages": MSG, "stream": "yes"}, 400, "stream"),
    ("n-greater-than-one", "/v1/chat/completions", {"model": "base", "messages": MSG, "n": 3}, 400, "n"),
    ("too-many-stops", "/v1/chat/completions", {"model": "base", "messages": MSG, "stop": list("abcde")}, 400, "stop"),
    (
        "prompt-longer-than-context",
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": LONG_TEXT}]},
        400,
        "context",
    ),
    ("completion-missing-prompt", "/v1/completions", {"model": "base"}, 400, "prompt"),
    ("completion-prompt-wrong-type", "/v1/completions", {"model": "base", "prompt": 42}, 400, "prompt"),
    ("completion-too-long", "/v1/completions", {"model": "base", "prompt": LONG_TEXT}, 400, "context"),
    ("completion-unknown-model", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "nope"),
    ("body-too-large", "/v1/chat/completions", b"{" + b" " * (5 * 1024 * 1024) + b"}", 413, "limit"),
    ("unknown-route", "/v1/engines", {"x": 1}, 404, "Not Found"),
]


@pytest.mark.parametrize(("path", "body", "status", "word"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_4xx_and_the_daemon_keeps_answering(
    daemon: Daemon, path: str, body: Any, status: int, word: str
) -> None:
    # Act
    kwargs: dict[str, Any] = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    resp = httpx.post(f"{daemon.url}{path}", timeout=60, **kwargs)
    # Assert
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert word.lower() in (err["message"] + " " + str(err["param"])).lower(), err
    assert "Traceback" not in resp.text
    assert daemon.proc.poll() is None
    assert daemon.chat().status_code == 200


def test_wrong_method_is_405(daemon: Daemon) -> None:
    resp = httpx.get(f"{daemon.url}/v1/chat/completions")
    assert resp.status_code == 405
    assert resp.json()["error"]["code"] == "method_not_allowed"


def test_error_names_the_bad_parameter(daemon: Daemon) -> None:
    resp = httpx.post(
        f"{daemon.url}/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": 5}]}
    )
    err = resp.json()["error"]
    assert resp.status_code == 400
    assert err["param"] == "messages[0].content"
