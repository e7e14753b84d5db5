"""Memories in Qdrant's embedded engine (`qdrant-edge-py`): one shard per namespace under MIRADOR_HOME/memory/.

One shard per namespace, not one shard with a namespace field: a namespace can never answer for another (no
filter to forget), dropping one deletes a folder, and compacting one rewrites only its own memories.

Forgetting must remove the text from disk, and Qdrant's delete does not: the write-ahead log and the payload pages
keep the bytes (measured: a deleted point's text is still in `wal/open-1` and `payload_storage/page_0.dat` after
flush and optimize). So a namespace is a generation folder named by `CURRENT`; forgetting deletes, then rewrites
the survivors into the next generation, switches `CURRENT` atomically and removes the old folder. A crash before
the switch leaves the old generation in charge (and the forget undone, never half done); leftovers of any crash
are removed when the namespace is next opened.
"""

import logging
import shutil
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_edge import (
    Bm25,
    Bm25Config,
    CountRequest,
    DecayKind,
    Distance,
    EdgeConfig,
    EdgeShard,
    EdgeSparseVectorParams,
    EdgeVectorParams,
    Expression,
    FieldCondition,
    Filter,
    Formula,
    Fusion,
    MatchValue,
    Modifier,
    Point,
    Prefetch,
    Query,
    QueryRequest,
    RangeFloat,
    ScrollRequest,
    UpdateOperation,
)

from node.core.fsutil import atomic_write_text, fsync_dir
from node.memory.backend import RRF_K, Candidate, Search
from node.memory.record import NAMESPACE, Memory, MemoryRefused, check_namespace

log = logging.getLogger(__name__)

DENSE = "dense"
SPARSE = "bm25"
POINTER = "CURRENT"
PAGE = 256
MAX_OPEN = 16  # shards kept open (each holds files, mmaps and a search thread); the least recently used is closed
MAX_NAMESPACES = 1024  # chats can name any namespace: a client must not make the node create folders without end
INDEX_AFTER = 20_000  # unindexed memories searched by brute force: ~2 ms at 20k, 10.6 ms at 100k (measured)
INDEX_TIMEOUT_S = 3600.0


def bm25() -> Bm25:
    """The BM25 term weights both backends use (English stemming and stopwords; IDF comes from the store)."""
    return Bm25(Bm25Config(language="english", avg_len=64.0))


def decayed(search: Search) -> Formula:
    """Qdrant's formula: the fused score times (1 - w + w * 0.5 ** (age of last use / half-life))."""
    assert search.half_life_s is not None
    decay = Expression.Decay(
        DecayKind.Exp,
        Expression.Variable("last_used"),
        Expression.Constant(search.now),
        midpoint=0.5,
        scale=search.half_life_s,
    )
    weight = search.decay_weight
    factor = Expression.Sum([Expression.Constant(1.0 - weight), Expression.Mult([Expression.Constant(weight), decay])])
    return Formula(Expression.Mult([Expression.Variable("$score"), factor]), defaults={"last_used": 0.0})


class EdgeBackend:
    """MemoryBackend over one embedded shard per namespace."""

    def __init__(self, root: Path, dimensions: int) -> None:
        self.root = root
        self.dimensions = dimensions
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._shards: OrderedDict[str, EdgeShard] = OrderedDict()
        self._unindexed: dict[str, int] = {}
        self._indexing: set[str] = set()
        self._child: subprocess.Popen[str] | None = None
        self._lock = threading.RLock()
        self._bm25 = bm25()
        for stale in self.root.glob(".*.dropping"):
            shutil.rmtree(stale, ignore_errors=True)

    def _config(self) -> EdgeConfig:
        return EdgeConfig(
            vectors={DENSE: EdgeVectorParams(size=self.dimensions, distance=Distance.Cosine)},
            sparse_vectors={SPARSE: EdgeSparseVectorParams(modifier=Modifier.Idf)},
            max_search_threads=1,  # searches take a few ms; a pool per open shard would multiply threads
        )

    def _folder(self, namespace: str) -> Path:
        return self.root / check_namespace(namespace)

    def _current(self, folder: Path) -> str | None:
        try:
            name = (folder / POINTER).read_text().strip()
        except FileNotFoundError:
            return None
        return name if name.startswith("g") and name[1:].isdigit() else None

    def _shard(self, namespace: str, create: bool = True) -> EdgeShard | None:
        shard = self._shards.get(namespace)
        if shard is not None:
            self._shards.move_to_end(namespace)
            return shard
        if namespace in self._indexing:
            raise MemoryRefused("indexing", f"the memory namespace {namespace!r} is being indexed; retry in a minute")
        folder = self._folder(namespace)
        generation = self._current(folder)
        if generation is None:
            if not create:
                return None
            if len(self.namespaces()) >= MAX_NAMESPACES:
                raise MemoryRefused(
                    "too_large", f"this node holds {MAX_NAMESPACES} memory namespaces already; forget one first"
                )
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            generation = "g1"
            shutil.rmtree(folder / generation, ignore_errors=True)
            (folder / generation).mkdir(mode=0o700)
            shard = EdgeShard.create(str(folder / generation), self._config())
            atomic_write_text(folder / POINTER, generation + "\n", mode=0o600)
        else:
            shard = EdgeShard.load(str(folder / generation))
        for other in folder.iterdir():  # a crashed compaction's half-written or superseded generation
            if other.is_dir() and other.name != generation:
                log.info("memory: removing %s left by an interrupted compaction", other)
                shutil.rmtree(other, ignore_errors=True)
        info = shard.info()
        self._unindexed[namespace] = max(0, 2 * info.points_count - info.indexed_vectors_count)  # dense + sparse
        self._shards[namespace] = shard
        while len(self._shards) > MAX_OPEN:
            _, oldest = self._shards.popitem(last=False)
            oldest.flush()
            oldest.close()
        return shard

    def needs_index(self, namespace: str) -> bool:
        """Whether enough memories went unindexed (searched by brute force) to build the index again."""
        with self._lock:
            return self._unindexed.get(namespace, 0) >= INDEX_AFTER and namespace not in self._indexing

    def index(self, namespace: str) -> bool:
        """Build the namespace's index in a child process (node.memory.indexer); meanwhile it is refused with
        `indexing`. Returns whether the child succeeded (on failure the shard is as it was: brute force)."""
        with self._lock:
            shard = self._shard(namespace, create=False)
            if shard is None:
                return False
            folder = self._folder(namespace)
            path = folder / str(self._current(folder))
            shard.flush()
            shard.close()
            del self._shards[namespace]
            self._indexing.add(namespace)
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "node.memory.indexer", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            self._child = child
            try:
                _, err = child.communicate(timeout=INDEX_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                log.error("memory: indexing %s took over %.0f s and was stopped", namespace, INDEX_TIMEOUT_S)
                return False
            if child.returncode != 0:  # killed (the node stopping) or failed: the shard stays as it was
                log.warning("memory: indexing %s ended with %s: %s", namespace, child.returncode, err[-2000:])
            return child.returncode == 0
        finally:
            with self._lock:
                self._child = None
                self._indexing.discard(namespace)
                self._unindexed.pop(namespace, None)  # counted again from the shard when it is next opened

    def namespaces(self) -> list[str]:
        """The namespaces that hold a store."""
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and NAMESPACE.fullmatch(p.name) and (p / POINTER).exists()
        )

    def _points(self, memories: list[Memory], vectors: np.ndarray) -> list[Point]:
        return [
            Point(m.id, {DENSE: v.astype(np.float32).tolist(), SPARSE: self._bm25.embed_document(m.text)}, m.payload())
            for m, v in zip(memories, vectors, strict=True)
        ]

    def upsert(self, memories: list[Memory], vectors: np.ndarray) -> None:
        """Store memories of one namespace; the write-ahead log makes them survive a killed process."""
        if not memories:
            return
        (namespace,) = {m.namespace for m in memories}
        with self._lock:
            shard = self._shard(namespace)
            assert shard is not None
            shard.update(UpdateOperation.upsert_points(self._points(memories, vectors)))
            self._unindexed[namespace] = self._unindexed.get(namespace, 0) + len(memories)

    def query(self, namespace: str, search: Search) -> list[Candidate]:
        """Dense and BM25 candidates fused by RRF, optionally decayed by the time of last use."""
        with self._lock:
            shard = self._shard(namespace, create=False)
            if shard is None:
                return []
            stages: list[Prefetch] = []
            pool = max(search.limit, 50)
            if search.mode in ("hybrid", "dense"):
                stages.append(
                    Prefetch(
                        limit=pool,
                        query=Query.Nearest(search.vector, using=DENSE),
                        score_threshold=search.min_similarity,
                    )
                )
            sparse = self._bm25.embed_query(search.text)
            if search.mode in ("hybrid", "bm25") and sparse.indices:
                stages.append(Prefetch(limit=pool, query=Query.Nearest(sparse, using=SPARSE)))
            if not stages:
                return []
            if len(stages) == 2:
                stages = [Prefetch(limit=pool, query=Fusion.Rrf(k=RRF_K), prefetches=stages)]  # type: ignore[arg-type]
            if search.half_life_s is not None:
                request = QueryRequest(
                    limit=search.limit,
                    prefetches=stages,
                    query=decayed(search),
                    with_payload=True,
                    with_vector=[DENSE],
                )
            else:
                (only,) = stages
                request = QueryRequest(
                    limit=search.limit,
                    prefetches=only.prefetches or None,
                    query=only.query,
                    score_threshold=only.score_threshold,
                    with_payload=True,
                    with_vector=[DENSE],
                )
            found = shard.query(request)
        return [
            Candidate(
                Memory.from_payload(p.id, namespace, p.payload or {}),
                float(p.score),
                np.asarray(_dense_of(p.vector), dtype=np.float32),
            )
            for p in found
        ]

    def get(self, namespace: str, ids: list[str]) -> list[Memory]:
        """The memories with these ids that exist."""
        with self._lock:
            shard = self._shard(namespace, create=False)
            if shard is None or not ids:
                return []
            records = shard.retrieve(list(ids), with_payload=True, with_vector=False)
        return [Memory.from_payload(r.id, namespace, r.payload or {}) for r in records]

    def scroll(self, namespace: str, offset: str | None, limit: int) -> tuple[list[Memory], str | None]:
        """A page of memories in id order and the next page's offset."""
        with self._lock:
            shard = self._shard(namespace, create=False)
            if shard is None:
                return [], None
            records, following = shard.scroll(ScrollRequest(offset=offset, limit=limit, with_payload=True))
        page = [Memory.from_payload(r.id, namespace, r.payload or {}) for r in records]
        return page, None if following is None else str(following)

    def count(self, namespace: str) -> int:
        """How many memories `namespace` holds."""
        with self._lock:
            shard = self._shard(namespace, create=False)
            return 0 if shard is None else shard.count(CountRequest(exact=True))

    def touch(self, namespace: str, ids: list[str], when: float) -> None:
        """Record a use of these memories."""
        with self._lock:
            shard = self._shard(namespace, create=False)
            if shard is not None and ids:
                shard.update(UpdateOperation.set_payload(list(ids), {"last_used": when}))

    def forget(
        self, namespace: str, *, ids: list[str] | None = None, source: str | None = None, before: float | None = None
    ) -> int:
        """Delete the memories matching every given condition, then compact the namespace."""
        conditions: list[Any] = []
        if source is not None:
            conditions.append(FieldCondition(key="source", match=MatchValue(source)))
        if before is not None:
            conditions.append(FieldCondition(key="created", range=RangeFloat(lt=before)))
        with self._lock:
            shard = self._shard(namespace, create=False)
            if shard is None:
                return 0
            held = shard.count(CountRequest(exact=True))
            if ids is not None:
                existing: list[Any] = [m.id for m in self.get(namespace, ids) if _matches(m, source, before)]
                if existing:
                    shard.update(UpdateOperation.delete_points(existing))
            elif conditions:
                shard.update(UpdateOperation.delete_points_by_filter(Filter(must=conditions)))
            else:
                raise ValueError("forget needs ids, a source or a time (drop forgets a whole namespace)")
            gone = held - shard.count(CountRequest(exact=True))
            if gone:
                self._compact(namespace)
            return gone

    def _compact(self, namespace: str) -> None:
        folder = self._folder(namespace)
        old_name = self._current(folder)
        assert old_name is not None
        new_name = f"g{int(old_name[1:]) + 1}"
        old = self._shards.pop(namespace)
        target = folder / new_name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(mode=0o700)
        fresh = EdgeShard.create(str(target), self._config())
        offset: Any = None
        while True:
            records, offset = old.scroll(ScrollRequest(offset=offset, limit=PAGE, with_payload=True, with_vector=True))
            if records:
                fresh.update(UpdateOperation.upsert_points([Point(r.id, r.vector or {}, r.payload) for r in records]))
            if offset is None:
                break
        fresh.flush()
        fresh.close()
        fsync_dir(folder)
        atomic_write_text(folder / POINTER, new_name + "\n", mode=0o600)
        old.close()
        shutil.rmtree(folder / old_name)
        fsync_dir(folder)
        fresh = EdgeShard.load(str(target))
        self._unindexed[namespace] = fresh.info().points_count  # the new generation is one unindexed segment
        self._shards[namespace] = fresh

    def drop(self, namespace: str) -> int:
        """Delete the namespace's folder; returns how many memories it held."""
        with self._lock:
            folder = self._folder(namespace)
            if not folder.exists():
                return 0
            if namespace in self._indexing:
                raise MemoryRefused(
                    "indexing", f"the memory namespace {namespace!r} is being indexed; retry in a minute"
                )
            held = self.count(namespace)
            shard = self._shards.pop(namespace, None)
            if shard is not None:
                shard.close()
            doomed = self.root / f".{namespace}.dropping"
            folder.rename(doomed)
            fsync_dir(self.root)
            shutil.rmtree(doomed)
            return held

    def stop_indexing(self) -> None:
        """Stop an index build (a killed build leaves the shard as it was: measured, all memories kept)."""
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()

    def close(self) -> None:
        """Flush and close every open shard."""
        self.stop_indexing()
        with self._lock:
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()


def _dense_of(vector: Any) -> list[float]:
    if isinstance(vector, dict):
        return list(vector.get(DENSE, []))
    return list(vector or [])


def _matches(memory: Memory, source: str | None, before: float | None) -> bool:
    return (source is None or memory.source == source) and (before is None or memory.created < before)
