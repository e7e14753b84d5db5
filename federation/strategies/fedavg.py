"""FedAvg: the average of the updates weighted by each member's number of local examples.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data",
https://arxiv.org/abs/1602.05629. Not robust: one member can move the average anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.server.strategy.aggregate import aggregate

from federation.strategies.base import Aggregate, Update, check_updates, from_flower, to_flower


class FedAvg:
    """Weighted mean Σ wᵢ·xᵢ / Σ wᵢ (Flower's `aggregate`); the only rule possible on homomorphically encrypted sums."""

    name = "fedavg"
    min_updates = 1

    def aggregate(self, updates: Sequence[Update]) -> Aggregate:
        """Average the updates weighted by `Update.weight`."""
        check_updates(updates, self.min_updates, self.name)
        vector = from_flower(aggregate(to_flower(updates)))
        return Aggregate(vector, tuple(u.member for u in updates), self.name)

    def __repr__(self) -> str:
        """The strategy as its constructor call."""
        return "FedAvg()"
