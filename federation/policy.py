"""A node's own privacy policy (`[privacy]` in node.toml): the rules a federation must keep for this node to train in
it, whatever its creator signed.

A creator chooses a federation's noise, δ and ε budget; a joiner that accepted them blindly would release updates
at whatever ε the creator liked (z = 0.001 with a budget of 10^6 is ε ≈ 550,000 per round). The policy is checked
before a node creates or joins a federation as a member (an aggregator-only member releases nothing of its own):
each rule it breaks is a `PolicyRefused` naming the rule, the federation's value and the node's limit.
"""

import math
from dataclasses import dataclass
from enum import StrEnum

from crypto.dp import Spend, epsilon
from crypto.refusal import Refused
from federation.descriptor import FederationDescriptor


class PolicyRule(StrEnum):
    """The rule of the node's policy that a federation breaks (the refusal's reason)."""

    NO_DP = "no_dp"
    NOISE_TOO_WEAK = "noise_too_weak"
    DELTA_TOO_LARGE = "delta_too_large"
    ROUND_EPSILON_TOO_LARGE = "round_epsilon_too_large"
    BUDGET_TOO_LARGE = "budget_too_large"


class PolicyRefused(Refused):
    """A federation this node's privacy policy does not allow it to train in; `reason` is the rule."""

    REASONS = PolicyRule


@dataclass(frozen=True)
class PrivacyPolicy:
    """The limits a federation must keep (defaults: ε ≤ 10 in all per dataset, ≤ 5 per round, z ≥ 0.5, δ ≤ 1e-5)."""

    max_epsilon_per_dataset: float = 10.0
    max_epsilon_per_round: float = 5.0
    min_noise_multiplier: float = 0.5
    max_delta: float = 1e-5
    allow_without_dp: bool = True  # `he` federations: updates encrypted, the decrypted mean has no DP guarantee

    def __post_init__(self) -> None:
        for name in ("max_epsilon_per_dataset", "max_epsilon_per_round", "min_noise_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"privacy.{name} must be a finite number > 0, got {value!r}")
        if not 0 < self.max_delta < 1:
            raise ValueError(f"privacy.max_delta must be in (0, 1), got {self.max_delta!r}")


def check_descriptor(descriptor: FederationDescriptor, policy: PrivacyPolicy, spend: Spend | None) -> None:
    """Raise PolicyRefused (the first rule broken) unless training in `descriptor`'s federation, releasing `spend`
    per round (None: no DP release), keeps `policy`."""
    dp = descriptor.privacy.dp
    no_dp = None if descriptor.uses_dp and spend is not None else f"in mode {descriptor.privacy.mode!r} (no DP)"
    check_release(
        f"federation {descriptor.name!r}",
        policy,
        spend,
        dp.noise_multiplier,
        dp.delta,
        descriptor.epsilon_budget,
        no_dp,
    )


def check_release(
    name: str,
    policy: PrivacyPolicy,
    spend: Spend | None,
    noise_multiplier: float,
    delta: float,
    budget: float,
    no_dp: str | None = None,
) -> None:
    """Raise PolicyRefused (the first rule broken) unless releasing `spend` per round (None, with `no_dp` saying why:
    no DP release) at z = `noise_multiplier` and `delta` under an ε `budget` keeps `policy`; `name` says whose."""
    if spend is None or no_dp is not None:
        if not policy.allow_without_dp:
            raise PolicyRefused(PolicyRule.NO_DP, f"{name} runs {no_dp or 'without DP'}; privacy.allow_without_dp")
        return
    if noise_multiplier < policy.min_noise_multiplier:
        raise PolicyRefused(
            PolicyRule.NOISE_TOO_WEAK,
            f"{name} adds noise z = {noise_multiplier:g}; privacy.min_noise_multiplier = "
            f"{policy.min_noise_multiplier:g}",
        )
    if delta > policy.max_delta:
        raise PolicyRefused(
            PolicyRule.DELTA_TOO_LARGE, f"{name} accounts at δ = {delta:g}; privacy.max_delta = {policy.max_delta:g}"
        )
    if budget > policy.max_epsilon_per_dataset:
        raise PolicyRefused(
            PolicyRule.BUDGET_TOO_LARGE,
            f"{name} allows ε = {budget:g} in all; privacy.max_epsilon_per_dataset = "
            f"{policy.max_epsilon_per_dataset:g}",
        )
    per_round = epsilon([spend], delta)
    if per_round > policy.max_epsilon_per_round:
        raise PolicyRefused(
            PolicyRule.ROUND_EPSILON_TOO_LARGE,
            f"one round of {name} spends ε = {per_round:.4g} (z = {spend.noise_multiplier:g}, q = "
            f"{spend.sample_rate:g}, {spend.steps} steps); privacy.max_epsilon_per_round = "
            f"{policy.max_epsilon_per_round:g}",
        )
