"""Concurrent requests are served or queued, never failed for being concurrent; an overlong wait gets 503."""

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon_harness import Daemon, decode_events, running, sse_events


def stream_chat(url: str, content: str, max_tokens: int) -> list[dict[str, Any]]:
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return decode_events(sse_events(resp.iter_lines()))


def test_eight_concurrent_streams_complete_with_well_formed_sse(daemon: Daemon) -> None:
    # Arrange: 8 streams on a node with 2 slots, so 6 of them must queue.
    results: dict[int, list[dict[str, Any]]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = stream_chat(daemon.url, f"Tell me fact number {i} about the sea.", 24)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    # Act
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    # Assert
    assert not errors, errors
    assert sorted(results) == list(range(8))
    for chunks in results.values():
        ids = {c["id"] for c in chunks}
        assert len(ids) == 1
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] in {"stop", "length"} and all(f is None for f in finishes[:-1])
        usage = chunks[-1]["usage"]
        assert 1 <= usage["completion_tokens"] <= 24
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text.strip()


@pytest.fixture(scope="module")
def one_slot_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home: Path = tmp_path_factory.mktemp("busy") / "home"
    yield from running(home, {"MIRADOR_INFERENCE_SLOTS": "1", "MIRADOR_API_QUEUE_TIMEOUT_S": "0.5"})


def test_request_waiting_too_long_gets_503_with_retry_after(one_slot_daemon: Daemon) -> None:
    # Arrange: occupy the only slot with a long generation (ignore_eos keeps it going).
    url = one_slot_daemon.url
    body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as long_resp:
        lines = long_resp.iter_lines()
        assert next(lines).startswith("data: ")  # generating now
        # Act
        t0 = time.monotonic()
        busy = one_slot_daemon.chat("Hello")
        waited = time.monotonic() - t0
    # Assert
    assert busy.status_code == 503
    assert int(busy.headers["Retry-After"]) >= 1
    assert busy.json()["error"]["code"] == "server_busy"
    assert 0.4 <= waited < 10
    assert one_slot_daemon.chat("Hello").status_code == 200  # the slot is free again


def test_client_disconnect_frees_the_slot(one_slot_daemon: Daemon) -> None:
    """Whatever the machine's speed: a generation that ran to its end would not count as `stopped`, so the count
    tells that the disconnect stopped it; the deadline only bounds the wait."""
    url = one_slot_daemon.url
    before = httpx.get(f"{url}/v1/node/status").json()["engine"]["stopped"]
    body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
        json.loads(next(resp.iter_lines())[6:])
    # the client went away after one event: the generation must stop and free the only slot
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/node/status").json()["engine"]
        if status["active"] == 0:
            break
        time.sleep(0.05)
    assert status["active"] == 0
    assert status["stopped"] == before + 1  # stopped, not run to its end
    assert one_slot_daemon.chat("Hello").status_code == 200
