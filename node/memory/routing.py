"""Semantic routing: under `model: auto`, when no `load_on` keyword matches, the personality whose description and
keywords are closest in meaning to the message answers (cosine of their embeddings >= `[memory] route_similarity`).
"""

import threading

import numpy as np

from node.adapters.personalities import Personality
from node.memory.embedder import Embedder


class SemanticRouter:
    """Embeddings of personalities' profiles (cached by their text) and the closest one to a message."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def closest(
        self, embedder: Embedder, query: np.ndarray, message: str, personalities: list[Personality]
    ) -> tuple[str, float] | None:
        """The name and similarity of the personality closest to `message` (embedded as `query`), if one reaches
        the threshold."""
        candidates = [p for p in personalities if p.profile_text]
        if not candidates or not message.strip():
            return None
        with self._lock:
            missing = [p.profile_text for p in candidates if p.profile_text not in self._cache]
            if missing:
                for text, vector in zip(missing, embedder.embed(missing), strict=True):
                    self._cache[text] = vector
            if len(self._cache) > 4 * len(candidates) + 64:  # edited manifests leave stale entries
                keep = {p.profile_text for p in candidates}
                self._cache = {t: v for t, v in self._cache.items() if t in keep}
            profiles = np.stack([self._cache[p.profile_text] for p in candidates])
        scores = profiles @ query
        best = int(np.argmax(scores))
        if float(scores[best]) < self.threshold:
            return None
        return candidates[best].name, float(scores[best])
