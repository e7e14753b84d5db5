"""Bulyan: pick n − 2f updates by repeated Krum, then per coordinate average the n − 4f values nearest the median.

El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium",
https://arxiv.org/abs/1802.07927. Tolerates f Byzantine members out of n ≥ 4f + 3; weights are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum

from federation.strategies.base import (
    Aggregate,
    AggregationError,
    Update,
    check_f,
    check_updates,
    from_flower,
    to_flower,
)


class Bulyan:
    """Bulyan through Flower's `aggregate_bulyan` with its inner Krum, tolerating f Byzantine members."""

    name = "bulyan"

    def __init__(self, f: int) -> None:
        """Configure the number of Byzantine members tolerated."""
        check_f(f, self.name)
        self.f = f

    @property
    def min_updates(self) -> int:
        """n ≥ 4f + 3, Bulyan's assumption."""
        return 4 * self.f + 3

    def aggregate(self, updates: Sequence[Update]) -> Aggregate:
        """Select n − 2f updates by repeated Krum and take the coordinate-wise trimmed mean around their median."""
        if len(updates) < self.min_updates:
            raise AggregationError(
                f"bulyan with f={self.f} needs at least {self.min_updates} updates (n ≥ 4f+3), got {len(updates)}"
            )
        check_updates(updates, self.min_updates, self.name)
        results = to_flower(updates)
        remaining = list(results)
        vector = from_flower(
            aggregate_bulyan(remaining, num_malicious=self.f, aggregation_rule=aggregate_krum, to_keep=0)
        )
        # Flower pops each Krum-selected result out of the list it is given: what is left was not selected.
        left_out = {id(r) for r in remaining}
        if len(left_out) != 2 * self.f:
            raise RuntimeError(f"flwr's aggregate_bulyan left {len(left_out)} results, expected 2f = {2 * self.f}")
        members = tuple(u.member for u, r in zip(updates, results, strict=True) if id(r) not in left_out)
        return Aggregate(vector, members, self.name)

    def __repr__(self) -> str:
        """The strategy as its constructor call."""
        return f"Bulyan(f={self.f})"
