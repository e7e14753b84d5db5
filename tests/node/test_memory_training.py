"""The loop closes: what a memory namespace holds trains a personality (`mirador train --from-memory`, the API's
`from_memory`), and an adapter trained on memory is never published."""

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.inference.models import embedded_model_path
from node.memory.record import Memory
from node.memory.training import memory_records
from node.training.base_model import torch_base_dir
from tests.daemon_harness import Daemon, run_cli, running


def memory(kind: str, text: str, source: str = "") -> Memory:
    return Memory(id=str(uuid.uuid4()), namespace="n", text=text, kind=kind, source=source)  # type: ignore[arg-type]


def test_corrections_and_well_rated_exchanges_come_first_and_badly_rated_ones_not_at_all() -> None:
    # Arrange
    memories = [
        memory("chat", "User: unrated?\nAssistant: maybe", "c-unrated"),
        memory("document", "A paragraph of the manual."),
        memory("chat", "User: bad?\nAssistant: wrong", "c-bad"),
        memory("chat", "User: good?\nAssistant: right", "c-good"),
        memory("correction", "User: capital of Peru?\nCorrect answer: Lima", "c-corrected"),
        memory("note", "Remember the milk."),
        memory("chat", "not an exchange at all", "c-odd"),
    ]
    ratings = {"c-bad": 2, "c-good": 5}
    # Act
    records = memory_records(memories, ratings)
    # Assert
    assert records == [
        {"messages": [{"role": "user", "content": "capital of Peru?"}, {"role": "assistant", "content": "Lima"}]},
        {"messages": [{"role": "user", "content": "good?"}, {"role": "assistant", "content": "right"}]},
        {"text": "A paragraph of the manual."},
        {"text": "Remember the milk."},
        {"messages": [{"role": "user", "content": "unrated?"}, {"role": "assistant", "content": "maybe"}]},
    ]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, torch_base_folder: Path) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("mnode") / "home"
    cached = torch_base_dir(home / "models", embedded_model_path())
    cached.parent.mkdir(parents=True)
    cached.symlink_to(torch_base_folder)
    yield from running(home, {"MIRADOR_MEMORY_REMEMBER_CHATS": "true"})


@pytest.mark.slow  # two LoRA training runs
def test_a_namespace_trains_a_personality_that_is_never_published(node: Daemon) -> None:
    # Arrange: a chat in the namespace, corrected by the user; notes added
    chat = httpx.post(
        f"{node.url}/v1/chat/completions",
        json={
            "model": "base",
            "messages": [{"role": "user", "content": "Who wrote my thesis?"}],
            "max_tokens": 6,
            "namespace": "thesis",
        },
        timeout=60,
    ).json()
    fb = httpx.post(
        f"{node.url}/v1/feedback",
        json={"completion_id": chat["id"], "correction": "You did, in 2024, on river ecology."},
        headers=node.auth,
    ).json()
    notes = [{"text": f"Thesis note {i}: sampling site {i} had {3 + i} species of mayfly."} for i in range(12)]
    httpx.post(f"{node.url}/v1/memory", json={"namespace": "thesis", "items": notes}, headers=node.auth)
    # Act: through the CLI (the node runs: memories come over the API) and through the API
    trained = run_cli(
        node.home, node.port, "train", "--from-memory", "-n", "thesis", "--adapter", "thesis", "--steps", "2"
    )
    started = httpx.post(
        f"{node.url}/v1/train", json={"adapter": "thesis-api", "from_memory": "thesis", "steps": 2}, headers=node.auth
    )
    deadline = time.monotonic() + 240
    while (state := httpx.get(f"{node.url}/v1/train/{started.json()['id']}").json())["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    empty = run_cli(node.home, node.port, "train", "--from-memory", "-n", "nothing-here", "--adapter", "x")
    folder = node.home / "adapters" / "thesis" / "v1"
    published = run_cli(
        node.home,
        node.port,
        "model",
        "publish",
        str(folder),
        "--kind",
        "adapter",
        "--name",
        "thesis",
        "--version",
        "1.0.0",
        "--no-bench",
    )
    # Assert
    assert fb["memory_id"] is not None
    corrections = [
        m
        for m in httpx.get(f"{node.url}/v1/memory", params={"namespace": "thesis"}, headers=node.auth).json()["data"]
        if m["kind"] == "correction"
    ]
    assert [m["id"] for m in corrections] == [fb["memory_id"]] and "river ecology" in corrections[0]["text"]
    assert trained.returncode == 0, trained.stderr
    assert "learning from 14 memories" in trained.stdout  # 1 correction, 12 notes, 1 unrated exchange
    assert state["status"] == "done", state
    assert json.loads((folder / "provenance.json").read_text()) == {"memory": "thesis"}
    assert json.loads((node.home / "adapters" / "thesis-api" / "v1" / "provenance.json").read_text()) == {
        "memory": "thesis"
    }
    assert empty.returncode == 2 and "holds nothing to learn from" in empty.stderr
    assert published.returncode == 1 and "never leaves this node" in published.stderr
    blocks = node.home / "blocks"  # refused before anything of it reached the content store
    assert not blocks.exists() or not [p for p in blocks.rglob("*") if p.is_file()]
