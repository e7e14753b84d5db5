"""Central (server-side) differential privacy as a wrapper around a strategy, in the style of Flower's
`DifferentialPrivacyServerSideFixedClipping`: clip every update to L2 norm C, aggregate, add Gaussian noise.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
https://arxiv.org/abs/1710.06963 (the calibration Flower's `compute_stdv` cites: std = z·C/n).

This mode trusts the aggregator with the clear updates. Mirador's `dp` privacy mode is member-side instead:
each member clips and noises its own update before releasing it (`crypto.dp.privatize`), and the aggregator
then runs a plain strategy. This module does not depend on that code; it clips locally with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from federation.strategies.base import Aggregate, AggregationError, Strategy, Update, Vector, check_updates


def clip_l2(vector: Vector, clip_norm: float) -> Vector:
    """The vector scaled by min(1, C / ‖v‖₂), so that its L2 norm is at most C."""
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if norm <= clip_norm:
        return vector
    return (vector * (clip_norm / norm)).astype(np.float32)


class ServerSideGaussian:
    """Clip each update to `clip_norm`, aggregate with `strategy`, add N(0, (noise_multiplier·clip_norm/n)²) noise.

    The std z·C/n makes each round (z, C)-Gaussian for FedAvg with equal weights: one member moves the
    mean by at most C/n. With unequal weights one member can move FedAvg by C·wᵢ/Σw, so give every update
    the same weight when the guarantee matters. For other wrapped strategies the noise is added the same
    way, but their sensitivity is not C/n and no guarantee is claimed. Updates must be deltas (new − global),
    not absolute weights, for clipping to mean anything. numpy's generator is not a cryptographic source.
    """

    def __init__(
        self,
        strategy: Strategy,
        clip_norm: float,
        noise_multiplier: float,
        rng: np.random.Generator | None = None,
    ) -> None:
        """Wrap `strategy`; `rng` defaults to a generator seeded from the OS."""
        if not (isinstance(clip_norm, int | float) and math.isfinite(clip_norm) and clip_norm > 0):
            raise AggregationError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
        if not (
            isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier) and noise_multiplier >= 0
        ):
            raise AggregationError(f"noise_multiplier must be a finite number ≥ 0, got {noise_multiplier!r}")
        self.strategy = strategy
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.rng = rng if rng is not None else np.random.default_rng()

    @property
    def name(self) -> str:
        """The wrapped strategy's name with the privacy mechanism, e.g. `fedavg+central-dp`."""
        return f"{self.strategy.name}+central-dp"

    @property
    def min_updates(self) -> int:
        """As many updates as the wrapped strategy needs."""
        return self.strategy.min_updates

    def noise_std(self, n: int) -> float:
        """The std of the noise added to an aggregate of n updates: noise_multiplier · clip_norm / n."""
        return self.noise_multiplier * self.clip_norm / n

    def aggregate(self, updates: Sequence[Update]) -> Aggregate:
        """Clip, aggregate with the wrapped strategy, then add the Gaussian noise."""
        check_updates(updates, self.min_updates, self.name)
        clipped = [Update(u.member, clip_l2(u.vector, self.clip_norm), u.weight) for u in updates]
        inner = self.strategy.aggregate(clipped)
        noise = self.rng.normal(0.0, self.noise_std(len(updates)), size=inner.vector.shape)
        vector = (inner.vector.astype(np.float64) + noise).astype(np.float32)
        return Aggregate(vector, inner.members, self.name)

    def __repr__(self) -> str:
        """The wrapper as its constructor call."""
        return (
            f"ServerSideGaussian({self.strategy!r}, clip_norm={self.clip_norm}, "
            f"noise_multiplier={self.noise_multiplier})"
        )
