"""The node's memory: remember (chats, documents, notes, corrections), recall (hybrid, decayed, diverse), forget.

Every method blocks (embedding, the store): the daemon calls them in worker threads. Memory never leaves the node:
nothing here is reachable from the publishing, gossip or federation code (tests/test_layering.py), and an adapter
trained on memory is never published (node.memory.training).
"""

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from node.adapters.personalities import Personality
from node.core.config import MemorySection
from node.core.fsutil import atomic_write_text
from node.core.notify import Notify, ignore
from node.memory.backend import MemoryBackend, Mode, Search
from node.memory.embedder import Embedder
from node.memory.mmr import mmr
from node.memory.record import (
    MAX_TEXT_CHARS,
    Hit,
    Kind,
    Memory,
    MemoryRefused,
    check_id,
    check_memory,
    check_namespace,
    new_memory,
)
from node.memory.routing import SemanticRouter

log = logging.getLogger(__name__)

SETTINGS = ".namespaces.json"  # not a valid namespace name: it never collides with one
MAX_SEARCH = 100
RECENT_QUERIES = 16
HEADER = "Memories from earlier chats and the user's documents (possibly out of date; use them only if they help):"


class NamespaceSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What one namespace remembers by itself."""

    chats: bool = True


class NewMemory(msgspec.Struct, frozen=True, kw_only=True):
    """A memory to add: its text and where it came from."""

    text: str
    kind: Kind = "note"
    source: str = ""
    position: int = 0


def open_backend(root: Path, cfg: MemorySection, dimensions: int) -> MemoryBackend:
    """The embedded store under `root`, or the Qdrant server at `[memory] url`."""
    if cfg.url:
        from node.memory.server import ServerBackend

        return ServerBackend(cfg.url, cfg.api_key or None, dimensions)
    from node.memory.edge import EdgeBackend

    return EdgeBackend(root, dimensions)


class MemoryService:
    """Remember, recall and forget, over one backend and one embedding model."""

    def __init__(
        self,
        root: Path,
        cache: Path,
        cfg: MemorySection,
        backend: MemoryBackend | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.root, self.cache, self.cfg = root, cache, cfg
        self._embedder = embedder
        self._owns_embedder = embedder is None
        self.router = SemanticRouter(cfg.route_similarity)
        self._indexer: threading.Thread | None = None
        self._index_lock = threading.Lock()
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._recent_lock = threading.Lock()
        self.backend = backend if backend is not None else open_backend(root, cfg, Embedder.dimensions)
        self.notify: Notify = ignore  # the daemon's event bus: `memory.added`

    @property
    def embedder(self) -> Embedder:
        """The embedding model, loaded (and converted, the first time) on first use."""
        if self._embedder is None:
            self._embedder = Embedder(self.cache, threads=self.cfg.threads)
        return self._embedder

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings of `texts`."""
        return self.embedder.embed(texts)

    def query_vector(self, text: str) -> np.ndarray:
        """The embedding of one query, kept for the next few: a chat's message is embedded once for routing and
        recall together."""
        with self._recent_lock:
            cached = self._recent.get(text)
            if cached is not None:
                self._recent.move_to_end(text)
                return cached
        vector = self.embed([text])[0]
        with self._recent_lock:
            self._recent[text] = vector
            while len(self._recent) > RECENT_QUERIES:
                self._recent.popitem(last=False)
        return vector

    # -- remembering ------------------------------------------------------------------------------------------------

    def add(self, namespace: str, items: list[NewMemory]) -> list[Memory]:
        """Embed and store `items` in `namespace`; stored durably when this returns."""
        memories = [new_memory(namespace, i.text, i.kind, i.source, i.position) for i in items]
        if memories:
            self.backend.upsert(memories, self.embed([m.text for m in memories]))
            self._index_later(namespace)
            kinds = sorted({m.kind for m in memories})
            self.notify("memory.added", {"namespace": namespace, "count": len(memories), "kinds": kinds})
        return memories

    def _index_later(self, namespace: str) -> None:
        """Build the namespace's vector index in the background once enough memories went unindexed."""
        with self._index_lock:
            if self._indexer is not None and self._indexer.is_alive():
                return
            if not self.backend.needs_index(namespace):
                return
            log.info("memory: indexing namespace %s in the background", namespace)
            self._indexer = threading.Thread(target=self.backend.index, args=(namespace,), name="memory-index")
            self._indexer.start()

    def remember_exchange(self, namespace: str, user: str, answer: str, source: str) -> Memory | None:
        """Remember one chat exchange, unless chats are off for the node or this namespace."""
        if not (self.cfg.remember_chats and self.settings(namespace).chats) or not user.strip() or not answer.strip():
            return None
        text = f"User: {user.strip()}\nAssistant: {answer.strip()}"
        (memory,) = self.add(namespace, [NewMemory(text=text[:MAX_TEXT_CHARS], kind="chat", source=source)])
        return memory

    # -- recalling --------------------------------------------------------------------------------------------------

    def search(
        self,
        namespace: str,
        query: str,
        limit: int = 5,
        *,
        mode: Mode = "hybrid",
        decay: bool = True,
        diverse: bool = True,
        min_similarity: float | None = None,
    ) -> list[Hit]:
        """The best memories for `query` in `namespace`: hybrid (or dense/BM25 alone), decayed, then MMR."""
        check_namespace(namespace)
        limit = max(1, min(limit, MAX_SEARCH))
        search = Search(
            vector=self.query_vector(query).tolist(),
            text=query,
            limit=min(MAX_SEARCH, limit * 4) if diverse else limit,
            mode=mode,
            min_similarity=min_similarity,
            half_life_s=self.cfg.half_life_days * 86400.0 if decay else None,
            decay_weight=self.cfg.decay_weight,
            now=time.time(),
        )
        found = self.backend.query(namespace, search)
        chosen = mmr(found, limit, self.cfg.mmr_lambda) if diverse else found[:limit]
        return [Hit(c.memory, c.score) for c in chosen]

    def context_for(
        self, namespace: str, query: str, budget: int, count_tokens: Callable[[str], int]
    ) -> tuple[str, list[str]]:
        """The system-prompt block of the best memories for `query` within `budget` tokens, and their ids.

        Memories found are marked as used (temporal decay counts from the last use)."""
        if budget <= 0 or self.cfg.inject <= 0 or not query.strip() or self.backend.count(namespace) == 0:
            return "", []  # nothing to recall: the embedding model is not even needed
        hits = self.search(namespace, query, self.cfg.inject, min_similarity=self.cfg.min_similarity)
        chosen: list[Memory] = []
        used = count_tokens(HEADER)
        for hit in hits:  # the most relevant first, as long as they fit
            cost = count_tokens(memory_line(hit.memory)) + 1
            if used + cost > budget:
                continue  # a shorter one further down may still fit
            chosen.append(hit.memory)
            used += cost
        if not chosen:
            return "", []
        # shown oldest first, not by score: recalling marks memories as used, which reorders their scores, and a
        # block that stays the same from turn to turn lets the engine reuse the prompt it already evaluated
        chosen.sort(key=lambda m: (m.created, m.id))
        ids = [m.id for m in chosen]
        self.backend.touch(namespace, ids, time.time())
        return "\n".join([HEADER, *(memory_line(m) for m in chosen)]), ids

    def route(self, message: str, personalities: list[Personality]) -> tuple[str, float] | None:
        """The personality closest in meaning to `message` (and its similarity), if one is close enough."""
        return self.router.closest(self.embedder, self.query_vector(message), message, personalities)

    # -- reading and forgetting -------------------------------------------------------------------------------------

    def get(self, namespace: str, memory_id: str) -> Memory:
        """One memory by id, or refused with `not_found`."""
        found = self.backend.get(check_namespace(namespace), [check_id(memory_id)])
        if not found:
            raise MemoryRefused("not_found", f"no memory {memory_id!r} in namespace {namespace!r}")
        return found[0]

    def page(self, namespace: str, offset: str | None, limit: int) -> tuple[list[Memory], str | None]:
        """A page of a namespace's memories and the offset of the next."""
        start = None if offset is None else check_id(offset)
        return self.backend.scroll(check_namespace(namespace), start, max(1, min(limit, 1000)))

    def all(self, namespace: str) -> Iterator[Memory]:
        """Every memory of `namespace`, page by page."""
        offset: str | None = None
        while True:
            page, offset = self.page(namespace, offset, 500)
            yield from page
            if offset is None:
                return

    def forget(
        self, namespace: str, *, ids: list[str] | None = None, source: str | None = None, before: float | None = None
    ) -> int:
        """Forget matching memories (gone from disk: the namespace is compacted); `drop` forgets a namespace."""
        checked = None if ids is None else [check_id(i) for i in ids]
        return self.backend.forget(check_namespace(namespace), ids=checked, source=source, before=before)

    def drop(self, namespace: str) -> int:
        """Forget a whole namespace and its settings."""
        held = self.backend.drop(check_namespace(namespace))
        settings = self._all_settings()
        if settings.pop(namespace, None) is not None:
            self._save_settings(settings)
        return held

    def namespaces(self) -> list[dict[str, Any]]:
        """Every namespace with its count and settings."""
        names = sorted(set(self.backend.namespaces()) | set(self._all_settings()))
        return [{"namespace": n, "memories": self.backend.count(n), "chats": self.settings(n).chats} for n in names]

    def import_memories(self, memories: list[Memory]) -> int:
        """Store exported memories again (same ids, times and provenance; vectors recomputed here)."""
        by_space: dict[str, list[Memory]] = {}
        for m in memories:
            by_space.setdefault(check_memory(m).namespace, []).append(m)
        for namespace, group in by_space.items():
            self.backend.upsert(group, self.embed([m.text for m in group]))
            self._index_later(namespace)
        return len(memories)

    # -- per-namespace settings -------------------------------------------------------------------------------------

    def _all_settings(self) -> dict[str, NamespaceSettings]:
        try:
            raw = msgspec.json.decode((self.root / SETTINGS).read_bytes(), type=dict[str, NamespaceSettings])
            return {check_namespace(k): v for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, msgspec.DecodeError) as exc:  # MemoryRefused is a ValueError too
            log.warning("memory: ignoring unreadable %s (%s)", self.root / SETTINGS, exc)
            return {}

    def _save_settings(self, settings: dict[str, NamespaceSettings]) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {k: msgspec.to_builtins(v) for k, v in sorted(settings.items())}
        atomic_write_text(self.root / SETTINGS, json.dumps(data, indent=2) + "\n", mode=0o600)

    def settings(self, namespace: str) -> NamespaceSettings:
        """The namespace's own settings (defaults when never set)."""
        return self._all_settings().get(namespace, NamespaceSettings())

    def configure(self, namespace: str, *, chats: bool) -> NamespaceSettings:
        """Turn remembering chats in `namespace` on or off."""
        settings = self._all_settings()
        settings[check_namespace(namespace)] = NamespaceSettings(chats=chats)
        self._save_settings(settings)
        return settings[namespace]

    def close(self) -> None:
        """Stop a running index build, flush the store and free the embedding model."""
        stop = getattr(self.backend, "stop_indexing", None)
        if stop is not None:
            stop()
        if self._indexer is not None:
            self._indexer.join()
        self.backend.close()
        if self._embedder is not None and self._owns_embedder:
            self._embedder.close()
        self._embedder = None


def memory_line(memory: Memory) -> str:
    """How one memory reads in a chat's system prompt: its day, kind, document source and text."""
    return f"- ({_day(memory.created)}, {memory.kind}{_from(memory)}) {memory.text}"


def _day(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d")


def _from(memory: Memory) -> str:
    return f", {memory.source}" if memory.kind == "document" and memory.source else ""
