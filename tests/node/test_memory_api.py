"""Memory through a real daemon: OpenAI's embeddings and chats through the real `openai` client, /v1/memory, the
`mirador memory` CLI, and a daemon SIGKILLed during a bulk add."""

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

from node.memory.embedder import Embedder
from tests.daemon_harness import Daemon, decode_events, run_cli, running, sse_events, start_daemon
from tests.pdf_file import write_pdf

REMEMBER = {"MIRADOR_MEMORY_REMEMBER_CHATS": "true"}
FACT = "The project's codename is BLUEFALCON and its launch is on the 3rd of March."
OTHER = ["Bees make honey from the nectar of flowers.", "The boiler's pressure should stay near 1.5 bar."]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from running(tmp_path_factory.mktemp("memory") / "home", REMEMBER)


@pytest.fixture(scope="module")
def client(node: Daemon) -> OpenAI:
    return OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=60)


def add(node: Daemon, namespace: str, texts: list[str]) -> list[str]:
    body = {"namespace": namespace, "items": [{"text": t} for t in texts]}
    r = httpx.post(f"{node.url}/v1/memory", json=body, headers=node.auth, timeout=60)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def memories(node: Daemon, namespace: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{node.url}/v1/memory", params={"namespace": namespace, "limit": 1000}, headers=node.auth)
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def test_openai_embeddings_are_the_models_vectors(client: OpenAI, embedder: Embedder) -> None:
    # Arrange
    texts = ["How do bees make honey?", "Honey comes from nectar."]
    # Act: the client asks for base64 by default and decodes it; float on request
    packed = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    floats = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0], encoding_format="float")
    # Assert
    expected = embedder.embed(texts)
    got = np.array([d.embedding for d in packed.data], dtype=np.float32)
    assert got.shape == (2, 384) and [d.index for d in packed.data] == [0, 1]
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(np.array(floats.data[0].embedding) - expected[0]).max() < 1e-5
    assert packed.usage.prompt_tokens == sum(embedder.count_tokens(t) for t in texts)


def test_a_chat_in_a_namespace_gets_its_memory_and_says_which(node: Daemon, client: OpenAI) -> None:
    # Arrange
    fact_id, *_ = add(node, "launch", [FACT, *OTHER])
    question = [{"role": "user", "content": "What is the codename of the project?"}]
    # Act: the namespace as a field, then as a header, then streamed
    raw = client.chat.completions.with_raw_response.create(
        model="base", messages=question, max_tokens=8, temperature=0, extra_body={"namespace": "launch"}
    )
    by_header = client.chat.completions.create(
        model="base", messages=question, max_tokens=8, temperature=0, extra_headers={"X-Mirador-Namespace": "launch"}
    )
    body = {"model": "base", "messages": question, "max_tokens": 8, "stream": True, "namespace": "launch"}
    with httpx.stream("POST", f"{node.url}/v1/chat/completions", json=body, timeout=60) as resp:
        chunks = decode_events(sse_events(resp.iter_lines()))
        streamed_header = resp.headers["x-mirador-memory-ids"]
    # Assert
    reply = raw.parse()
    assert fact_id in reply.model_extra["memory"]["ids"] and reply.model_extra["memory"]["namespace"] == "launch"
    assert fact_id in raw.headers["x-mirador-memory-ids"].split(",")
    assert fact_id in by_header.model_extra["memory"]["ids"]
    assert fact_id in streamed_header.split(",") and all(fact_id in c["memory"]["ids"] for c in chunks)
    # the injected memory is in the prompt: more prompt tokens than the same chat without memory
    bare = client.chat.completions.create(
        model="base",
        messages=question,
        max_tokens=8,
        temperature=0,
        extra_body={"namespace": "launch", "memory": False},
    )
    assert reply.usage.prompt_tokens > bare.usage.prompt_tokens + 10


def test_memory_false_injects_nothing_and_remembers_nothing(node: Daemon, client: OpenAI) -> None:
    # Arrange
    add(node, "private", [FACT])
    before = memories(node, "private")
    # Act
    reply = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "What is the codename of the project?"}],
        max_tokens=8,
        extra_body={"namespace": "private", "memory": False},
    )
    # Assert
    assert "memory" not in (reply.model_extra or {})
    assert memories(node, "private") == before


def test_a_chat_exchange_is_remembered_in_its_namespace(node: Daemon, client: OpenAI) -> None:
    # Act
    reply = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "My cat is called Whiskers."}],
        max_tokens=6,
        extra_body={"namespace": "pets"},
    )
    # Assert
    (remembered,) = [m for m in memories(node, "pets") if m["kind"] == "chat"]
    assert remembered["source"] == reply.id
    assert remembered["text"].startswith("User: My cat is called Whiskers.\nAssistant: ")
    assert memories(node, "default") == [] or all(m["source"] != reply.id for m in memories(node, "default"))


def test_memory_routes_refuse_without_the_token_and_name_bad_input(node: Daemon) -> None:
    # Act
    anonymous = httpx.get(f"{node.url}/v1/memory", params={"namespace": "launch"})
    bad_space = httpx.post(
        f"{node.url}/v1/memory", json={"namespace": "../x", "items": [{"text": "a"}]}, headers=node.auth
    )
    unknown = httpx.get(f"{node.url}/v1/memory/00000000-0000-4000-8000-000000000000", headers=node.auth)
    not_an_id = httpx.get(f"{node.url}/v1/memory/..%2F..%2Fetc", headers=node.auth)
    bad_chat = httpx.post(
        f"{node.url}/v1/chat/completions",
        json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "namespace": "UPPER case"},
    )
    # Assert
    assert anonymous.status_code == 401
    assert bad_space.status_code == 400 and bad_space.json()["error"]["param"] == "namespace"
    assert unknown.status_code == 404 and not_an_id.status_code == 404
    assert bad_chat.status_code == 400 and bad_chat.json()["error"]["param"] == "namespace"


def test_cli_adds_documents_searches_forgets_and_moves_a_namespace(node: Daemon, tmp_path: Path) -> None:
    # Arrange: a folder with markdown and a PDF
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "garden.md").write_text("# Garden\n\nThe tomatoes are watered every second morning.\n")
    write_pdf(docs / "car.pdf", [["The car's tyres were changed in November."], ["Next service: 30000 km."]])

    def cli(*args: str) -> Any:
        out = run_cli(node.home, node.port, "memory", *args)
        assert out.returncode == 0, out.stderr
        return out

    # Act
    cli("add", str(docs), "-n", "house")
    found = cli("search", "when were the tyres changed?", "-n", "house", "--json")
    export = tmp_path / "house.jsonl"
    cli("export", "-n", "house", "--out", str(export))
    cli("import", str(export), "-n", "house-copy")
    cli("forget", "--source", str(docs / "car.pdf"), "-n", "house")
    # Assert
    hits = json.loads(found.stdout)
    assert hits[0]["source"] == str((docs / "car.pdf").resolve()) and "tyres" in hits[0]["text"]
    exported = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(exported) == 2 and {m["kind"] for m in exported} == {"document"}
    copied = memories(node, "house-copy")
    assert sorted(m["id"] for m in copied) == sorted(m["id"] for m in exported)
    assert [m["source"] for m in memories(node, "house")] == [str((docs / "garden.md").resolve())]
    spaces = {s["namespace"]: s["memories"] for s in json.loads(cli("namespaces", "--json").stdout)}
    assert spaces["house"] == 1 and spaces["house-copy"] == 2


def test_a_daemon_killed_during_a_bulk_add_keeps_every_acknowledged_memory(tmp_path: Path) -> None:
    # Arrange: a writer adding batches as fast as the daemon acknowledges them
    d = start_daemon(tmp_path / "home")
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            items = [{"text": f"Bulk memory number {n + i}: the {n + i}th line of a long import."} for i in range(16)]
            try:
                r = httpx.post(
                    f"{d.url}/v1/memory", json={"namespace": "bulk", "items": items}, headers=d.auth, timeout=30
                )
            except httpx.HTTPError:
                return  # the daemon is gone
            if r.status_code != 200:
                return
            acknowledged.extend(m["id"] for m in r.json()["data"])
            n += 16

    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 64 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Act: SIGKILL the daemon itself mid-stream, then start it again on the same home
    os.kill(d.pid, signal.SIGKILL)
    thread.join(timeout=30)
    stop.set()
    d.stop(signal.SIGKILL)
    assert len(acknowledged) >= 64
    d = start_daemon(d.home)
    try:
        # Assert: every acknowledged memory is there and the store answers
        present = {m["id"] for m in memories(d, "bulk")}
        assert set(acknowledged) <= present
        r = httpx.post(
            f"{d.url}/v1/memory/search", json={"namespace": "bulk", "query": "memory number 3"}, headers=d.auth
        )
        assert r.status_code == 200 and r.json()["data"]
    finally:
        d.stop()
