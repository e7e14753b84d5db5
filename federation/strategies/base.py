"""What every aggregation strategy shares: the `Update` it receives, the `Aggregate` it returns, the checks.

A strategy is a small class around one of Flower's aggregation functions (`flwr.server.strategy.aggregate`),
which work on `list[tuple[NDArrays, int]]` (arrays, number of examples). Mirador's updates are flat float32
vectors, so each one becomes a single-layer `NDArrays` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]
FlowerResults = list[tuple[list[npt.NDArray[np.float32]], int]]


class AggregationError(ValueError):
    """Updates a strategy cannot aggregate, or a strategy configured with impossible parameters."""


@dataclass(frozen=True)
class Update:
    """One member's adapter update for a round: a flat float32 vector, weighted by its number of local examples."""

    member: str
    vector: Vector
    weight: int = 1

    def __post_init__(self) -> None:
        """Refuse a nameless member, a non-array vector or a weight that is not an int ≥ 1."""
        if not isinstance(self.member, str) or not self.member:
            raise AggregationError(f"member must be a non-empty string, got {self.member!r}")
        if not isinstance(self.vector, np.ndarray):
            raise AggregationError(f"update from {self.member!r}: vector must be a numpy array")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | np.integer) or self.weight < 1:
            raise AggregationError(f"update from {self.member!r}: weight must be an int ≥ 1, got {self.weight!r}")


@dataclass(frozen=True)
class Aggregate:
    """The result of a round: the aggregated vector, the members whose updates went into it, the strategy's name."""

    vector: Vector
    members: tuple[str, ...]
    strategy: str


class Strategy(Protocol):
    """An aggregation rule: at least `min_updates` updates in, one `Aggregate` out."""

    @property
    def name(self) -> str:
        """The strategy's name in `STRATEGIES` (and in a federation descriptor)."""
        ...

    @property
    def min_updates(self) -> int:
        """The fewest updates the rule can aggregate (with its configured number of Byzantine members f)."""
        ...

    def aggregate(self, updates: Sequence[Update]) -> Aggregate:
        """Aggregate the round's updates; raise AggregationError when they cannot be."""
        ...


def check_updates(updates: Sequence[Update], min_updates: int, strategy: str) -> int:
    """Run the checks every strategy needs and return the common vector length; raise AggregationError otherwise."""
    needed = max(1, min_updates)
    if len(updates) < needed:
        raise AggregationError(f"{strategy} needs at least {needed} updates, got {len(updates)}")
    seen: set[str] = set()
    length: int | None = None
    for u in updates:
        if u.member in seen:
            raise AggregationError(f"duplicate member {u.member!r}: one update per member per round")
        seen.add(u.member)
        v = u.vector
        if v.ndim != 1:
            raise AggregationError(f"update from {u.member!r}: vector must be 1-D, got shape {v.shape}")
        if v.dtype != np.float32:
            raise AggregationError(f"update from {u.member!r}: vector must be float32, got {v.dtype}")
        if v.size == 0:
            raise AggregationError(f"update from {u.member!r}: empty vector")
        if length is None:
            length = v.size
        elif v.size != length:
            raise AggregationError(
                f"update from {u.member!r}: length {v.size} differs from the others' {length} (different adapters?)"
            )
        if not np.isfinite(v).all():
            raise AggregationError(f"update from {u.member!r}: vector contains NaN or infinite values")
    assert length is not None  # at least one update was checked
    return length


def check_f(f: int, strategy: str) -> None:
    """Refuse a number of tolerated Byzantine members that is not an int ≥ 0."""
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise AggregationError(f"{strategy}: f (Byzantine members tolerated) must be an int ≥ 0, got {f!r}")


def to_flower(updates: Sequence[Update]) -> FlowerResults:
    """Updates as Flower's `results`: one single-layer `NDArrays` per update, with its weight as num_examples."""
    return [([u.vector], int(u.weight)) for u in updates]


def from_flower(arrays: Sequence[npt.NDArray[np.generic]]) -> Vector:
    """Flower's single-layer `NDArrays` result as one float32 vector."""
    (layer,) = arrays
    return np.asarray(layer, dtype=np.float32)
