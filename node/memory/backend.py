"""What a memory store must do, whichever Qdrant holds it (the embedded engine or a server)."""

from typing import Literal, NamedTuple, Protocol

import msgspec
import numpy as np

from node.memory.record import Memory

Mode = Literal["hybrid", "dense", "bm25"]
RRF_K = 60  # Cormack et al. 2009, https://dl.acm.org/doi/10.1145/1571941.1572114


class Search(msgspec.Struct, frozen=True, kw_only=True):
    """One retrieval: the query as a vector and as text, how to score, how many candidates."""

    vector: list[float]
    text: str
    limit: int
    mode: Mode = "hybrid"
    min_similarity: float | None = None  # cosine floor of the dense candidates
    half_life_s: float | None = None  # None: no temporal decay
    decay_weight: float = 0.5  # score x (1 - w + w * 0.5 ** (age / half_life)): at most w of the score decays
    now: float = 0.0


class Candidate(NamedTuple):
    """A memory the store ranked, its score and its dense vector (for MMR)."""

    memory: Memory
    score: float
    vector: np.ndarray


class MemoryBackend(Protocol):
    """A store of memories in namespaces; every call blocks (callers use worker threads)."""

    def namespaces(self) -> list[str]:
        """The namespaces that hold memories."""
        ...

    def upsert(self, memories: list[Memory], vectors: np.ndarray) -> None:
        """Store `memories` (all in one namespace) with their dense vectors; durable when it returns."""
        ...

    def query(self, namespace: str, search: Search) -> list[Candidate]:
        """The best `search.limit` candidates in `namespace`, best first."""
        ...

    def get(self, namespace: str, ids: list[str]) -> list[Memory]:
        """The memories with these ids (missing ones left out)."""
        ...

    def scroll(self, namespace: str, offset: str | None, limit: int) -> tuple[list[Memory], str | None]:
        """A page of the namespace's memories and the offset of the next page (None at the end)."""
        ...

    def count(self, namespace: str) -> int:
        """How many memories the namespace holds."""
        ...

    def touch(self, namespace: str, ids: list[str], when: float) -> None:
        """Mark memories as used at `when` (temporal decay counts from the last use)."""
        ...

    def forget(
        self, namespace: str, *, ids: list[str] | None = None, source: str | None = None, before: float | None = None
    ) -> int:
        """Delete matching memories and compact, so their text is gone from disk; returns how many."""
        ...

    def drop(self, namespace: str) -> int:
        """Delete a whole namespace from disk; returns how many memories it held."""
        ...

    def needs_index(self, namespace: str) -> bool:
        """Whether the namespace should build its vector index now (`index`)."""
        ...

    def index(self, namespace: str) -> bool:
        """Build the namespace's vector index (blocking, long); returns whether it succeeded."""
        ...

    def close(self) -> None:
        """Flush and release everything."""
        ...
