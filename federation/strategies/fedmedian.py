"""FedMedian: the coordinate-wise median of the updates (weights ignored).

Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
https://arxiv.org/abs/1803.01498. Every coordinate stays within the honest values while fewer than half the
members are malicious.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.server.strategy.aggregate import aggregate_median

from federation.strategies.base import Aggregate, Update, check_updates, from_flower, to_flower


class FedMedian:
    """Coordinate-wise median (Flower's `aggregate_median`; an even count averages the two middle values)."""

    name = "fedmedian"
    min_updates = 1

    def aggregate(self, updates: Sequence[Update]) -> Aggregate:
        """Take the median of each coordinate over the updates."""
        check_updates(updates, self.min_updates, self.name)
        vector = from_flower(aggregate_median(to_flower(updates)))
        return Aggregate(vector, tuple(u.member for u in updates), self.name)

    def __repr__(self) -> str:
        """The strategy as its constructor call."""
        return "FedMedian()"
