"""The memory store for real: Qdrant's embedded engine (and a Qdrant server's client API in its local mode), the
real embedding model on llama.cpp, real files under memory/."""

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from node.adapters.personalities import Personality
from node.core.config import MemorySection
from node.memory import edge
from node.memory.backend import MemoryBackend, Search
from node.memory.documents import chunks, read_text
from node.memory.edge import INDEX_AFTER, EdgeBackend
from node.memory.embedder import Embedder
from node.memory.record import Memory, MemoryRefused, new_memory
from node.memory.server import ServerBackend
from node.memory.service import HEADER, MemoryService, NewMemory
from tests.pdf_file import write_pdf

FACTS = [
    "The spare key of the flat is under the blue flowerpot.",
    "Anna's birthday is on the 14th of May; she likes orchids.",
    "The project's staging server is called kestrel and runs Debian.",
    "Sourdough needs to rest twelve hours before baking.",
]
YEAR = 365 * 86400.0


def open_backend(kind: str, root: Path) -> MemoryBackend:
    if kind == "edge":
        return EdgeBackend(root, Embedder.dimensions)
    # a Qdrant server through qdrant-client; none can be installed here, so its local mode, which speaks the same
    # client API (in memory: its on-disk local mode pickles)
    return ServerBackend(None, None, Embedder.dimensions, client=QdrantClient(location=":memory:"))


@pytest.fixture(params=["edge", "server"])
def memory(request: pytest.FixtureRequest, tmp_path: Path, embedder: Embedder) -> Iterator[MemoryService]:
    root = tmp_path / "memory"
    service = MemoryService(root, tmp_path, MemorySection(), open_backend(request.param, root), embedder)
    yield service
    service.close()


def add_facts(memory: MemoryService, namespace: str) -> list[Memory]:
    return memory.add(namespace, [NewMemory(text=f, source="facts.txt", position=i) for i, f in enumerate(FACTS)])


def test_added_memories_are_found_by_meaning_and_by_keyword(memory: MemoryService) -> None:
    # Arrange
    added = add_facts(memory, "home")
    # Act
    by_meaning = memory.search("home", "where can I find the key to get into my apartment?", limit=1)
    by_keyword = memory.search("home", "kestrel", limit=1, mode="bm25")
    # Assert
    assert [h.memory.id for h in by_meaning] == [added[0].id]
    assert [h.memory.id for h in by_keyword] == [added[2].id]
    assert by_meaning[0].memory.source == "facts.txt" and by_meaning[0].memory.kind == "note"


def test_a_memory_in_one_namespace_never_appears_in_another(memory: MemoryService) -> None:
    # Arrange
    add_facts(memory, "home")
    memory.add("work", [NewMemory(text="The quarterly report is due on Friday.")])
    # Act
    found = memory.search("work", FACTS[0], limit=10)
    keyword = memory.search("work", "flowerpot orchids kestrel sourdough", limit=10, mode="bm25")
    # Assert
    assert [h.memory.text for h in found] == ["The quarterly report is due on Friday."]
    assert keyword == []
    assert memory.search("nowhere", FACTS[0]) == []


def test_decay_orders_two_equally_similar_memories_by_their_last_use(memory: MemoryService, embedder: Embedder) -> None:
    # Arrange: the same text twice (equal similarity), one used a year ago
    now = time.time()
    fresh = new_memory("home", FACTS[1], "note")
    old = Memory(
        id=str(uuid.uuid4()), namespace="home", text=FACTS[1], kind="note", created=now - YEAR, last_used=now - YEAR
    )
    memory.backend.upsert([fresh, old], embedder.embed([FACTS[1], FACTS[1]]))
    # Act
    question = "when is Anna's birthday?"
    decayed = memory.search("home", question, limit=2, diverse=False)
    dense = memory.search("home", question, limit=2, diverse=False, mode="dense")
    flat = memory.search("home", question, limit=2, diverse=False, decay=False, mode="dense")
    # Assert: with decay the recently used one is first; a year at a 30-day half-life leaves the old one the
    # undecayed part of its score (1 - decay_weight = a half), no less
    assert [h.memory.id for h in decayed] == [fresh.id, old.id]
    assert [h.memory.id for h in dense] == [fresh.id, old.id]
    assert dense[1].score / dense[0].score == pytest.approx(0.5, abs=0.01)
    assert flat[0].score == pytest.approx(flat[1].score, abs=1e-5)


def test_a_recalled_memory_counts_as_fresh_again(memory: MemoryService, embedder: Embedder) -> None:
    # Arrange: two equal memories, both unused for a year
    now = time.time()
    a, b = (
        Memory(
            id=str(uuid.uuid4()), namespace="home", text=FACTS[1], kind="note", created=now - YEAR, last_used=now - YEAR
        )
        for _ in range(2)
    )
    memory.backend.upsert([a, b], embedder.embed([FACTS[1], FACTS[1]]))
    # Act: b is used (recalled into a chat)
    memory.backend.touch("home", [b.id], now)
    ranked = memory.search("home", "Anna's birthday", limit=2, diverse=False)
    # Assert
    assert [h.memory.id for h in ranked] == [b.id, a.id]
    assert memory.get("home", b.id).last_used == pytest.approx(now)


def test_mmr_prefers_a_different_memory_over_a_near_duplicate(memory: MemoryService) -> None:
    # Arrange: two near-duplicates of one fact and another relevant fact
    memory.add(
        "home",
        [
            NewMemory(text="Anna's birthday is on the 14th of May."),
            NewMemory(text="Anna's birthday is the 14th of May."),
            NewMemory(text="Anna likes orchids and lilies."),
        ],
    )
    # Act
    plain = memory.search("home", "Anna's birthday", limit=2, diverse=False)
    diverse = memory.search("home", "Anna's birthday", limit=2, diverse=True)
    # Assert
    assert all("birthday" in h.memory.text for h in plain)
    assert {"birthday" in h.memory.text for h in diverse} == {True, False}


def test_forget_by_id_source_and_age(memory: MemoryService) -> None:
    # Arrange
    added = add_facts(memory, "home")
    note = memory.add("home", [NewMemory(text="A note from elsewhere.", source="other")])[0]
    # Act / Assert: by id
    assert memory.forget("home", ids=[added[0].id]) == 1
    assert memory.backend.get("home", [added[0].id]) == []
    # by source
    assert memory.forget("home", source="facts.txt") == 3
    # by age: nothing is older than an hour, then everything is older than now
    assert memory.forget("home", before=time.time() - 3600) == 0
    assert memory.forget("home", before=time.time() + 1) == 1
    assert memory.backend.count("home") == 0 and note.id
    # a malformed id is refused, not passed to the store
    with pytest.raises(MemoryRefused):
        memory.forget("home", ids=["../../etc"])


def test_forgotten_text_is_gone_from_every_file_under_memory(tmp_path: Path, embedder: Embedder) -> None:
    # Arrange: the embedded store, a memory holding a marker, flushed to disk
    root = tmp_path / "memory"
    memory = MemoryService(root, tmp_path, MemorySection(), EdgeBackend(root, Embedder.dimensions), embedder)
    marker = "zq-marker-7f3a9"
    kept = memory.add("home", [NewMemory(text=f"The safe code is {marker}.")] + [NewMemory(text=f) for f in FACTS])
    memory.close()
    memory = MemoryService(root, tmp_path, MemorySection(), EdgeBackend(root, Embedder.dimensions), embedder)
    assert any(marker.encode() in p.read_bytes() for p in root.rglob("*") if p.is_file())  # the bytes were there
    # Act
    assert memory.forget("home", ids=[kept[0].id]) == 1
    # Assert: no file under memory/ holds it (WAL, payload pages, segments), the rest is still there
    assert not [p for p in root.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]
    assert memory.backend.count("home") == len(FACTS)
    memory.close()
    reopened = EdgeBackend(root, Embedder.dimensions)
    assert reopened.count("home") == len(FACTS)
    reopened.close()


def test_memories_survive_a_restart_and_a_crashed_compaction_is_cleaned_up(tmp_path: Path, embedder: Embedder) -> None:
    # Arrange: memories, then the leftover of a compaction that died before switching generations
    root = tmp_path / "memory"
    memory = MemoryService(root, tmp_path, MemorySection(), EdgeBackend(root, Embedder.dimensions), embedder)
    added = add_facts(memory, "home")
    memory.close()
    leftover = root / "home" / "g7"
    leftover.mkdir()
    (leftover / "half-written").write_text("partial")
    # Act
    memory = MemoryService(root, tmp_path, MemorySection(), EdgeBackend(root, Embedder.dimensions), embedder)
    found = memory.search("home", "where is the spare key?", limit=1)
    # Assert
    assert [h.memory.id for h in found] == [added[0].id]
    assert not leftover.exists()
    memory.close()


def test_a_namespace_dropped_is_gone_from_disk_with_its_settings(tmp_path: Path, embedder: Embedder) -> None:
    # Arrange
    root = tmp_path / "memory"
    memory = MemoryService(root, tmp_path, MemorySection(), EdgeBackend(root, Embedder.dimensions), embedder)
    add_facts(memory, "home")
    memory.configure("home", chats=False)
    # Act
    held = memory.drop("home")
    # Assert
    assert held == len(FACTS)
    assert not (root / "home").exists() and memory.namespaces() == []
    assert memory.settings("home").chats is True
    memory.close()


def test_chat_exchanges_are_remembered_unless_the_namespace_says_no(memory: MemoryService) -> None:
    # Arrange
    memory.configure("quiet", chats=False)
    # Act
    kept = memory.remember_exchange("home", "What is my cat called?", "Whiskers.", "chatcmpl-1")
    skipped = memory.remember_exchange("quiet", "What is my cat called?", "Whiskers.", "chatcmpl-2")
    # Assert
    assert kept is not None and kept.kind == "chat" and "Whiskers" in kept.text
    assert skipped is None and memory.backend.count("quiet") == 0


def test_context_for_a_chat_fits_its_token_budget_and_names_what_it_used(memory: MemoryService) -> None:
    # Arrange: a budget counted in characters, room for the header and one memory's line, not two
    added = add_facts(memory, "home")
    question = "Where is the spare key of the flat?"
    budget = len(HEADER) + 100
    # Act
    context, ids = memory.context_for("home", question, budget, len)
    none, no_ids = memory.context_for("home", question, len(HEADER) + 20, len)
    # Assert
    assert ids == [added[0].id] and FACTS[0] in context and context.startswith(HEADER)
    assert len(context) <= budget
    assert (none, no_ids) == ("", [])


def test_documents_are_chunked_with_overlap_and_pdf_text_is_read(tmp_path: Path) -> None:
    # Arrange
    paragraphs = [" ".join(f"p{p}w{i}" for i in range(70)) for p in range(4)]
    pdf = write_pdf(tmp_path / "notes.pdf", [["The boiler was serviced in October."], ["Its pressure is 1.5 bar."]])
    # Act
    parts = chunks("\n\n".join(paragraphs), "doc.txt", words=100, overlap=20)
    text = read_text(pdf)
    # Assert: every word is in some chunk, consecutive chunks share 20 words, positions count up
    assert [c.position for c in parts] == list(range(len(parts)))
    assert set(" ".join(paragraphs).split()) == {w for c in parts for w in c.text.split()}
    for a, b in itertools.pairwise(parts):
        assert a.text.split()[-20:] == b.text.split()[:20]
    assert "serviced in October" in text and "1.5 bar" in text
    with pytest.raises(MemoryRefused):
        read_text(tmp_path / "image.png")


@pytest.mark.slow  # builds an HNSW index over 20k vectors (~10 s on 2 cores)
def test_a_large_namespace_is_indexed_in_a_child_process_and_refused_meanwhile(tmp_path: Path) -> None:
    # Arrange: more unindexed memories than INDEX_AFTER (random unit vectors: the store is real, the texts short)
    root = tmp_path / "memory"
    backend = EdgeBackend(root, Embedder.dimensions)
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((INDEX_AFTER + 500, Embedder.dimensions)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    memories = [new_memory("big", f"memory {i}", "note") for i in range(len(vectors))]
    for start in range(0, len(memories), 2000):
        backend.upsert(memories[start : start + 2000], vectors[start : start + 2000])
    probe = Search(vector=vectors[123].tolist(), text="memory", limit=1, mode="dense")
    assert backend.needs_index("big")
    # Act: index in a thread; the namespace is refused until it is done
    done = threading.Event()
    result: list[bool] = []
    worker = threading.Thread(target=lambda: (result.append(backend.index("big")), done.set()))
    worker.start()
    while "big" not in backend._indexing and not done.is_set():
        time.sleep(0.01)
    refused = None
    if not done.is_set():
        with pytest.raises(MemoryRefused) as refused_info:
            backend.query("big", probe)
        refused = refused_info.value.reason
    worker.join(timeout=600)
    # Assert
    assert result == [True] and refused in ("indexing", None)
    assert not backend.needs_index("big") and backend.count("big") == len(memories)
    assert [c.memory.id for c in backend.query("big", probe)] == [memories[123].id]
    backend.close()


def test_open_shards_are_bounded_and_namespaces_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: more namespaces than the store keeps open (a chat can name any namespace)
    backend = EdgeBackend(tmp_path / "memory", Embedder.dimensions)
    vector = np.zeros((1, Embedder.dimensions), dtype=np.float32)
    vector[0, 0] = 1.0
    names = [f"ns{i}" for i in range(edge.MAX_OPEN + 4)]
    added = {n: new_memory(n, f"memory of {n}", "note") for n in names}
    # Act
    for n in names:
        backend.upsert([added[n]], vector)
    found = {n: backend.get(n, [added[n].id]) for n in names}
    monkeypatch.setattr(edge, "MAX_NAMESPACES", len(names))
    # Assert: every namespace still answers (closed ones reopen), at most MAX_OPEN are open, no namespace past the cap
    assert all([(m.id, m.text) for m in found[n]] == [(added[n].id, added[n].text)] for n in names)
    assert len(backend._shards) <= edge.MAX_OPEN
    with pytest.raises(MemoryRefused) as refused:
        backend.upsert([new_memory("one-too-many", "x", "note")], vector)
    assert refused.value.reason == "too_large" and not (tmp_path / "memory" / "one-too-many").exists()
    backend.close()


def test_a_chats_message_is_embedded_once_for_routing_and_recall(tmp_path: Path, embedder: Embedder) -> None:
    # Arrange: the real model, its calls counted
    calls: list[list[str]] = []

    class Counting(Embedder):
        def __init__(self) -> None:  # shares the session model's weights and context
            self.__dict__.update(embedder.__dict__)

        def embed(self, texts: list[str]) -> np.ndarray:
            calls.append(list(texts))
            return embedder.embed(texts)

    root = tmp_path / "memory"
    memory = MemoryService(root, tmp_path, MemorySection(), EdgeBackend(root, Embedder.dimensions), Counting())
    add_facts(memory, "home")
    gardener = Personality("gardener", "base", (("garden", 1.0),), (("allotment",),), "Gardening and plants")
    message = "How often should I water my tomato plants?"
    calls.clear()
    # Act: what a chat under `auto` does with memory on
    memory.route(message, [gardener])
    memory.context_for("home", message, 500, len)
    # Assert
    assert [c for c in calls if message in c] == [[message]]
    memory.close()
