"""Loaded LoRA adapters kept hot over the one base model, least recently used evicted beyond a byte budget.

Used only from the batch worker thread (which owns the llama.cpp context), so loads, attaches and frees never
race a decode. Adapters in use by a running generation are pinned and never evicted; the budget may be exceeded
while they are all pinned (the overshoot is reported in `stats()`). Each file is checked (node.adapters.check)
before llama.cpp opens it.
"""

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.adapters.check import AdapterRejected, BaseDims, check_adapter_file
from node.inference.llama_backend import LlamaModel, LoraAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """One adapter a generation wants attached: its version key (`name@version`), file and scale."""

    key: str
    path: Path
    scale: float = 1.0

    @property
    def name(self) -> str:
        """The adapter's name without the version."""
        return self.key.partition("@")[0]


@dataclass
class _Entry:
    adapter: LoraAdapter
    size: int
    pins: int = 0


class AdapterCache:
    """LRU of loaded adapters within `budget_bytes` for a base of shape `dims` (None: adapters unsupported).

    The worker sets `detach`, which clears the context's adapters before an attached one is freed.
    """

    def __init__(self, model: LlamaModel, dims: BaseDims | None, budget_bytes: int) -> None:
        self.model, self.dims, self.budget = model, dims, budget_bytes
        self.detach: Callable[[], None] = lambda: None
        self.attached: frozenset[str] = frozenset()  # keys attached to the context now (set by the worker)
        self._lock = threading.Lock()  # guards the dict for stats() from other threads
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.loads = self.hits = self.evictions = 0
        self.load_s = 0.0

    @property
    def used_bytes(self) -> int:
        """Bytes of adapters loaded now."""
        return sum(e.size for e in self._entries.values())

    def acquire(self, refs: Sequence[AdapterRef]) -> list[tuple[LoraAdapter, float]]:
        """Load (or reuse) and pin every adapter of `refs`; on failure nothing stays pinned."""
        pinned: list[AdapterRef] = []
        try:
            out = []
            for ref in refs:
                out.append((self._pin(ref), ref.scale))
                pinned.append(ref)
            return out
        except BaseException:
            self.release(pinned)
            raise
        finally:
            self._trim()

    def release(self, refs: Sequence[AdapterRef]) -> None:
        """Unpin adapters a finished generation used (they stay loaded until evicted)."""
        for ref in refs:
            entry = self._entries.get(ref.key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
        self._trim()

    def _pin(self, ref: AdapterRef) -> LoraAdapter:
        entry = self._entries.get(ref.key)
        if entry is not None:
            self.hits += 1
            with self._lock:
                self._entries.move_to_end(ref.key)
            entry.pins += 1
            return entry.adapter
        if self.dims is None:
            raise AdapterRejected("the served model's metadata does not describe its layers; it takes no adapters")
        started = time.perf_counter()
        check_adapter_file(ref.path, self.dims)
        size = ref.path.stat().st_size
        adapter = LoraAdapter(self.model, ref.path)
        self.load_s += time.perf_counter() - started
        self.loads += 1
        with self._lock:
            self._entries[ref.key] = _Entry(adapter, size, pins=1)
        # a newer version of the same adapter supersedes the older ones: drop them once unpinned
        for key, old in list(self._entries.items()):
            if key != ref.key and key.partition("@")[0] == ref.name and old.pins == 0:
                self._free(key)
        log.info("loaded adapter %s (%.1f MB) in %.1f ms", ref.key, size / 1e6, (time.perf_counter() - started) * 1e3)
        return adapter

    def _trim(self) -> None:
        for key in list(self._entries):  # oldest first
            if self.used_bytes <= self.budget:
                return
            if self._entries[key].pins == 0:
                self._free(key)
                self.evictions += 1

    def _free(self, key: str) -> None:
        if key in self.attached:
            self.detach()
            self.attached = frozenset()
        with self._lock:
            entry = self._entries.pop(key)
        entry.adapter.close()
        log.info("unloaded adapter %s", key)

    def stats(self) -> dict[str, Any]:
        """Loaded adapters (LRU order, most recent last), bytes against the budget, counters."""
        with self._lock:
            loaded = [{"key": k, "bytes": e.size, "in_use": e.pins} for k, e in self._entries.items()]
        return {
            "loaded": loaded,
            "used_bytes": sum(e["bytes"] for e in loaded),
            "budget_bytes": self.budget,
            "loads": self.loads,
            "hits": self.hits,
            "evictions": self.evictions,
            "load_ms_total": round(self.load_s * 1e3, 2),
        }

    def close(self) -> None:
        """Free every adapter (the context is gone or detached)."""
        for key in list(self._entries):
            self._free(key)
