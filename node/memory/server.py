"""Memories on a Qdrant server through `qdrant-client` (`[memory] url`): one collection per namespace.

The same retrieval as the embedded store (dense + BM25 prefetches fused by RRF, the decay formula outside). BM25
term weights are computed here with the embedded engine's `Bm25`, so both stores index the same terms; the server
applies IDF. Forgetting deletes the points; the server's own optimizer vacuums its segments later (its disk, its
schedule), which the embedded store's compaction does at once.
"""

import threading
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from node.memory.backend import RRF_K, Candidate, Search
from node.memory.edge import DENSE, SPARSE, bm25
from node.memory.record import Memory, check_namespace

PREFIX = "mirador_"
PAGE = 256


class ServerBackend:
    """MemoryBackend over a Qdrant server (or qdrant-client's local mode, which speaks the same API)."""

    def __init__(
        self, url: str | None, api_key: str | None, dimensions: int, client: QdrantClient | None = None
    ) -> None:
        self.client = client if client is not None else QdrantClient(url=url, api_key=api_key, timeout=30)
        self.dimensions = dimensions
        self._bm25 = bm25()
        self._known: set[str] = set()
        self._lock = threading.RLock()

    def _name(self, namespace: str) -> str:
        return PREFIX + check_namespace(namespace)

    def _exists(self, namespace: str, create: bool) -> bool:
        name = self._name(namespace)
        if name in self._known:
            return True
        if self.client.collection_exists(name):
            self._known.add(name)
            return True
        if not create:
            return False
        self.client.create_collection(
            name,
            vectors_config={DENSE: models.VectorParams(size=self.dimensions, distance=models.Distance.COSINE)},
            sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
        )
        self._known.add(name)
        return True

    def namespaces(self) -> list[str]:
        """The namespaces this node has collections for."""
        names = [c.name for c in self.client.get_collections().collections]
        return sorted(n[len(PREFIX) :] for n in names if n.startswith(PREFIX))

    def upsert(self, memories: list[Memory], vectors: np.ndarray) -> None:
        """Store memories of one namespace (acknowledged by the server's write-ahead log)."""
        if not memories:
            return
        (namespace,) = {m.namespace for m in memories}
        with self._lock:
            self._exists(namespace, create=True)
        points = []
        for m, v in zip(memories, vectors, strict=True):
            sparse = self._bm25.embed_document(m.text)
            vector: dict[str, Any] = {DENSE: v.astype(np.float32).tolist()}
            if sparse.indices:
                vector[SPARSE] = models.SparseVector(indices=list(sparse.indices), values=list(sparse.values))
            points.append(models.PointStruct(id=m.id, vector=vector, payload=m.payload()))
        self.client.upsert(self._name(namespace), points, wait=True)

    def query(self, namespace: str, search: Search) -> list[Candidate]:
        """Dense and BM25 candidates fused by RRF, optionally decayed by the time of last use."""
        if not self._exists(namespace, create=False):
            return []
        pool = max(search.limit, 50)
        stages: list[models.Prefetch] = []
        if search.mode in ("hybrid", "dense"):
            stages.append(
                models.Prefetch(query=search.vector, using=DENSE, limit=pool, score_threshold=search.min_similarity)
            )
        sparse = self._bm25.embed_query(search.text)
        if search.mode in ("hybrid", "bm25") and sparse.indices:
            stages.append(
                models.Prefetch(
                    query=models.SparseVector(indices=list(sparse.indices), values=list(sparse.values)),
                    using=SPARSE,
                    limit=pool,
                )
            )
        if not stages:
            return []
        if len(stages) == 2:
            stages = [models.Prefetch(prefetch=stages, query=models.RrfQuery(rrf=models.Rrf(k=RRF_K)), limit=pool)]
        if search.half_life_s is not None:
            w = search.decay_weight
            decay = models.ExpDecayExpression(
                exp_decay=models.DecayParamsExpression(
                    x="last_used", target=search.now, scale=search.half_life_s, midpoint=0.5
                )
            )
            formula = models.MultExpression(
                mult=["$score", models.SumExpression(sum=[1.0 - w, models.MultExpression(mult=[w, decay])])]
            )
            found = self.client.query_points(
                self._name(namespace),
                prefetch=stages,
                query=models.FormulaQuery(formula=formula, defaults={"last_used": 0.0}),
                limit=search.limit,
                with_payload=True,
                with_vectors=[DENSE],
            ).points
        else:
            (only,) = stages
            found = self.client.query_points(
                self._name(namespace),
                prefetch=only.prefetch,
                query=only.query,
                using=only.using,
                score_threshold=only.score_threshold,
                limit=search.limit,
                with_payload=True,
                with_vectors=[DENSE],
            ).points
        return [
            Candidate(
                Memory.from_payload(p.id, namespace, p.payload or {}),
                float(p.score),
                np.asarray((p.vector or {}).get(DENSE, []) if isinstance(p.vector, dict) else [], dtype=np.float32),
            )
            for p in found
        ]

    def get(self, namespace: str, ids: list[str]) -> list[Memory]:
        """The memories with these ids that exist."""
        if not ids or not self._exists(namespace, create=False):
            return []
        found = self.client.retrieve(self._name(namespace), ids=list(ids), with_payload=True)
        return [Memory.from_payload(p.id, namespace, p.payload or {}) for p in found]

    def scroll(self, namespace: str, offset: str | None, limit: int) -> tuple[list[Memory], str | None]:
        """A page of memories and the next page's offset."""
        if not self._exists(namespace, create=False):
            return [], None
        records, following = self.client.scroll(
            self._name(namespace), offset=offset, limit=limit, with_payload=True, with_vectors=False
        )
        page = [Memory.from_payload(r.id, namespace, r.payload or {}) for r in records]
        return page, None if following is None else str(following)

    def count(self, namespace: str) -> int:
        """How many memories `namespace` holds."""
        if not self._exists(namespace, create=False):
            return 0
        return int(self.client.count(self._name(namespace), exact=True).count)

    def touch(self, namespace: str, ids: list[str], when: float) -> None:
        """Record a use of these memories."""
        if ids and self._exists(namespace, create=False):
            self.client.set_payload(self._name(namespace), {"last_used": when}, points=list(ids), wait=True)

    def forget(
        self, namespace: str, *, ids: list[str] | None = None, source: str | None = None, before: float | None = None
    ) -> int:
        """Delete the memories matching every given condition."""
        if not self._exists(namespace, create=False):
            return 0
        conditions: list[Any] = []
        if ids is not None:
            conditions.append(models.HasIdCondition(has_id=list(ids)))
        if source is not None:
            conditions.append(models.FieldCondition(key="source", match=models.MatchValue(value=source)))
        if before is not None:
            conditions.append(models.FieldCondition(key="created", range=models.Range(lt=before)))
        if not conditions:
            raise ValueError("forget needs ids, a source or a time (drop forgets a whole namespace)")
        held = self.count(namespace)
        self.client.delete(
            self._name(namespace),
            points_selector=models.FilterSelector(filter=models.Filter(must=conditions)),
            wait=True,
        )
        return held - self.count(namespace)

    def drop(self, namespace: str) -> int:
        """Delete the namespace's collection."""
        held = self.count(namespace)
        if self._exists(namespace, create=False):
            self.client.delete_collection(self._name(namespace))
        self._known.discard(self._name(namespace))
        return held

    def needs_index(self, namespace: str) -> bool:
        """Never: a Qdrant server's optimizer indexes by itself."""
        return False

    def index(self, namespace: str) -> bool:
        """Nothing to do (the server indexes by itself)."""
        return True

    def close(self) -> None:
        """Close the client."""
        self.client.close()
