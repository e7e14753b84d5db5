"""FedTrimmedAvg: per coordinate, drop the beta fraction of largest and of smallest values, average the rest.

Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
https://arxiv.org/abs/1803.01498. With n updates, ⌊beta·n⌋ values are cut at each end, so a beta with
⌊beta·n⌋ ≥ (number of malicious members) keeps every coordinate within the honest values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flwr.server.strategy.aggregate import aggregate_trimmed_avg

from federation.strategies.base import Aggregate, AggregationError, Update, check_updates, from_flower, to_flower


class FedTrimmedAvg:
    """Coordinate-wise trimmed mean (Flower's `aggregate_trimmed_avg`; weights ignored), 0 ≤ beta < 0.5."""

    name = "fedtrimmedavg"
    min_updates = 1

    def __init__(self, beta: float = 0.2) -> None:
        """Configure the fraction cut at each end of every coordinate."""
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta):
            raise AggregationError(f"fedtrimmedavg: beta must be a number in [0, 0.5), got {beta!r}")
        if not 0.0 <= beta < 0.5:
            raise AggregationError(f"fedtrimmedavg: beta must be in [0, 0.5), got {beta}")
        self.beta = float(beta)

    def aggregate(self, updates: Sequence[Update]) -> Aggregate:
        """Average each coordinate after cutting ⌊beta·n⌋ values at each end."""
        check_updates(updates, self.min_updates, self.name)
        vector = from_flower(aggregate_trimmed_avg(to_flower(updates), proportiontocut=self.beta))
        return Aggregate(vector, tuple(u.member for u in updates), self.name)

    def __repr__(self) -> str:
        """The strategy as its constructor call."""
        return f"FedTrimmedAvg(beta={self.beta})"
