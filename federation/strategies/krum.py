"""Krum and multi-Krum: keep the update(s) closest to their n − f − 2 nearest neighbours.

Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
https://papers.nips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html. Tolerates f Byzantine
members out of n ≥ 2f + 3. With m = 1 the result is one member's update, unchanged; with m > 1 (multi-Krum)
it is the example-weighted mean of the m best-scored updates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from flwr.server.strategy.aggregate import aggregate_krum

from federation.strategies.base import (
    Aggregate,
    AggregationError,
    Update,
    check_f,
    check_updates,
    from_flower,
    to_flower,
)


def krum_scores(vectors: Sequence[npt.NDArray[np.float32]], f: int) -> npt.NDArray[np.float64]:
    """Krum score of each vector: summed squared distances to its n − f − 2 nearest others, as Flower computes it."""
    n = len(vectors)
    distances = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            # The same float32 arithmetic as Flower's `_compute_distances`, so ties break the same way.
            distances[i, j] = distances[j, i] = np.linalg.norm(vectors[i] - vectors[j]) ** 2
    num_closest = max(1, n - f - 2)
    closest = [np.argsort(row)[1 : num_closest + 1] for row in distances]
    return np.array([np.sum(distances[i, closest[i]]) for i in range(n)])


class Krum:
    """Krum (m = 1) or multi-Krum (m > 1) through Flower's `aggregate_krum`, tolerating f Byzantine members."""

    name = "krum"

    def __init__(self, f: int, m: int = 1) -> None:
        """Configure the number of Byzantine members tolerated (f) and of updates kept (m)."""
        check_f(f, self.name)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise AggregationError(f"krum: m (updates kept) must be an int ≥ 1, got {m!r}")
        self.f = f
        self.m = m

    @property
    def min_updates(self) -> int:
        """n ≥ 2f + 3 (Krum's assumption) and n ≥ m + f (multi-Krum keeps at most the n − f honest ones)."""
        return max(2 * self.f + 3, self.m + self.f)

    def aggregate(self, updates: Sequence[Update]) -> Aggregate:
        """Keep the m updates with the lowest Krum scores and average them (m = 1: return the best one)."""
        if len(updates) < self.min_updates:
            raise AggregationError(
                f"krum with f={self.f}, m={self.m} needs at least {self.min_updates} updates "
                f"(n ≥ 2f+3 and n ≥ m+f), got {len(updates)}"
            )
        check_updates(updates, self.min_updates, self.name)
        results = to_flower(updates)
        if self.m == 1:
            vector = from_flower(aggregate_krum(results, num_malicious=self.f, to_keep=0))
            chosen = [next(i for i, u in enumerate(updates) if np.array_equal(u.vector, vector))]
        else:
            vector = from_flower(aggregate_krum(results, num_malicious=self.f, to_keep=self.m))
            scores = krum_scores([u.vector for u in updates], self.f)
            # Flower's own selection expression: the m lowest scores.
            chosen = sorted(int(i) for i in np.argsort(scores)[::-1][len(scores) - self.m :])
        return Aggregate(vector, tuple(updates[i].member for i in chosen), self.name)

    def __repr__(self) -> str:
        """The strategy as its constructor call."""
        return f"Krum(f={self.f}, m={self.m})"
