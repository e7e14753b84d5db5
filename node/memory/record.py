"""One memory: what was remembered, where it came from, when it was made and last used."""

import re
import time
import uuid
from enum import StrEnum
from typing import Any, Literal

import msgspec

from crypto.refusal import Refused

Kind = Literal["chat", "document", "note", "correction"]
KINDS: tuple[str, ...] = ("chat", "document", "note", "correction")
NAMESPACE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEFAULT_NAMESPACE = "default"
MAX_TEXT_CHARS = 8_000  # one memory; documents are chunked far below this


class MemoryReason(StrEnum):
    """Why a memory request is refused."""

    NAMESPACE = "invalid_namespace"
    NOT_FOUND = "not_found"
    EMPTY = "empty"
    TOO_LONG = "too_long"
    UNREADABLE = "unreadable"
    TOO_LARGE = "too_large"
    INDEXING = "indexing"  # the namespace's index is being built: retry in a minute


class MemoryRefused(Refused):
    """A memory request that cannot be done: `reason` (MemoryReason) and the detail."""

    REASONS = MemoryReason


def check_namespace(name: str) -> str:
    """`name` if it is a valid namespace (lowercase letters, digits, `.`, `_`, `-`; at most 63), else refused."""
    if not NAMESPACE.fullmatch(name):
        raise MemoryRefused(
            "invalid_namespace",
            f"invalid namespace {name[:80]!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return name


def check_id(memory_id: str) -> str:
    """`memory_id` in canonical form if it is a UUID, else refused."""
    try:
        return str(uuid.UUID(memory_id))
    except (ValueError, AttributeError, TypeError):
        raise MemoryRefused("not_found", f"{str(memory_id)[:80]!r} is not a memory id (a UUID)") from None


def check_memory(memory: "Memory") -> "Memory":
    """An imported memory checked as a new one would be: id, namespace, text."""
    check_id(memory.id)
    check_namespace(memory.namespace)
    if not memory.text.strip():
        raise MemoryRefused("empty", f"memory {memory.id} has no text")
    if len(memory.text) > MAX_TEXT_CHARS:
        raise MemoryRefused("too_long", f"memory {memory.id} is longer than {MAX_TEXT_CHARS} characters")
    return memory


class Memory(msgspec.Struct, frozen=True, kw_only=True):
    """A remembered text and its provenance; `id` is a UUID."""

    id: str
    namespace: str
    text: str
    kind: Kind
    source: str = ""
    position: int = 0  # the chunk's index within its source
    created: float = 0.0
    last_used: float = 0.0

    def payload(self) -> dict[str, Any]:
        """The fields stored beside the vectors (the namespace is the shard itself)."""
        return {
            "text": self.text,
            "kind": self.kind,
            "source": self.source,
            "position": self.position,
            "created": self.created,
            "last_used": self.last_used,
        }

    @classmethod
    def from_payload(cls, point_id: Any, namespace: str, payload: dict[str, Any]) -> "Memory":
        """The memory stored as `payload` under `point_id`."""
        return cls(
            id=str(point_id),
            namespace=namespace,
            text=str(payload.get("text", "")),
            kind=payload.get("kind", "note") if payload.get("kind") in KINDS else "note",
            source=str(payload.get("source", "")),
            position=int(payload.get("position", 0)),
            created=float(payload.get("created", 0.0)),
            last_used=float(payload.get("last_used", 0.0)),
        )


def new_memory(namespace: str, text: str, kind: Kind, source: str = "", position: int = 0) -> Memory:
    """A fresh memory with a new id, made and last used now."""
    if not text.strip():
        raise MemoryRefused("empty", "a memory needs some text")
    if len(text) > MAX_TEXT_CHARS:
        raise MemoryRefused(
            "too_long", f"a memory holds at most {MAX_TEXT_CHARS} characters (got {len(text)}); add it as a document"
        )
    now = time.time()
    return Memory(
        id=str(uuid.uuid4()),
        namespace=check_namespace(namespace),
        text=text,
        kind=kind,
        source=source,
        position=position,
        created=now,
        last_used=now,
    )


class Hit(msgspec.Struct, frozen=True):
    """A memory found by a search, with its final score (hybrid, decayed, then chosen by MMR)."""

    memory: Memory
    score: float
