"""Maximal marginal relevance: pick memories that are relevant and unlike the ones already picked.

Carbonell & Goldstein 1998, https://dl.acm.org/doi/10.1145/290941.291025. It runs here, over the store's final
candidates, so relevance is the hybrid, decayed score (Qdrant's own MMR query would rank by one vector alone).
"""

import numpy as np

from node.memory.backend import Candidate


def mmr(candidates: list[Candidate], k: int, lambda_: float) -> list[Candidate]:
    """Up to `k` candidates chosen greedily by lambda * relevance - (1 - lambda) * max similarity to those chosen.

    Relevance is the score scaled to [0, 1] by the best one; lambda = 1 keeps the store's order."""
    if not candidates or k <= 0:
        return []
    top = max(c.score for c in candidates)
    relevance = np.array([c.score / top if top > 0 else 0.0 for c in candidates])
    vectors = np.stack([c.vector for c in candidates])
    chosen: list[int] = []
    similar = np.zeros(len(candidates))  # max cosine to any chosen candidate (vectors are unit length)
    remaining = set(range(len(candidates)))
    while remaining and len(chosen) < k:
        order = sorted(remaining)
        gain = lambda_ * relevance[order] - (1.0 - lambda_) * similar[order]
        best = order[int(np.argmax(gain))]
        chosen.append(best)
        remaining.discard(best)
        similar = np.maximum(similar, vectors @ vectors[best])
    return [candidates[i] for i in chosen]
