"""A node's privacy policy against federation descriptors: each broken rule is refused by name (federation.policy)."""

from typing import Any

import pytest

from crypto.dp import epsilon
from crypto.identity import Identity
from federation.descriptor import DpParams, HeParams, Privacy, verify_descriptor
from federation.policy import PolicyRefused, PolicyRule, PrivacyPolicy, check_descriptor
from federation.privacy import round_spend
from tests.federation_support import make_descriptor

CREATOR = Identity.generate()


def descriptor(**over: Any) -> Any:
    return verify_descriptor(make_descriptor(CREATOR, **over))


def dp(z: float, delta: float = 1e-5, mode: str = "dp-user") -> Privacy:
    return Privacy(mode=mode, dp=DpParams(clip_norm=1.0, noise_multiplier=z, delta=delta))  # type: ignore[arg-type]


def spend_of(d: Any) -> Any:
    """One round's spend; example-level rounds at a sample rate of 0.5 (a node with twice its batch of examples)."""
    return round_spend(d, 0.5) if d.example_level else round_spend(d)


BROKEN: dict[str, tuple[dict[str, Any], PolicyRule]] = {
    # the example: a creator's z = 0.001 and budget 10^6 (ε ≈ 550,000 per round)
    "weak noise, huge budget": ({"privacy": dp(0.001), "epsilon_budget": 1e6}, PolicyRule.NOISE_TOO_WEAK),
    "large delta": ({"privacy": dp(1.0, delta=1e-3)}, PolicyRule.DELTA_TOO_LARGE),
    "budget above the node's": ({"epsilon_budget": 50.0}, PolicyRule.BUDGET_TOO_LARGE),
    "one round costs too much": ({"privacy": dp(0.6)}, PolicyRule.ROUND_EPSILON_TOO_LARGE),
    "20 DP-SGD steps at q = 0.5 cost too much": (
        {"privacy": dp(0.6, mode="dp"), "local_steps": 20},
        PolicyRule.ROUND_EPSILON_TOO_LARGE,
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_descriptor_that_breaks_a_rule_is_refused_naming_it(case: str) -> None:
    # Arrange
    over, rule = BROKEN[case]
    d = descriptor(**over)
    # Act
    with pytest.raises(PolicyRefused) as refused:
        check_descriptor(d, PrivacyPolicy(), spend_of(d))
    # Assert
    assert refused.value.reason == rule
    assert f"privacy.{'max_delta' if rule is PolicyRule.DELTA_TOO_LARGE else ''}" in refused.value.detail


def test_the_default_federation_fits_the_default_policy_and_its_round_epsilon_is_checked() -> None:
    # Arrange: z = 1 at q = 1 costs ε ≈ 4.39 per round at δ = 1e-5
    d = descriptor(privacy=dp(1.0))
    per_round = epsilon([round_spend(d)], 1e-5)  # type: ignore[list-item]
    # Act / Assert
    check_descriptor(d, PrivacyPolicy(), round_spend(d))
    with pytest.raises(PolicyRefused, match=f"ε = {per_round:.4g}"):
        check_descriptor(d, PrivacyPolicy(max_epsilon_per_round=per_round * 0.99), round_spend(d))


def test_a_federation_without_dp_is_refused_only_when_the_policy_says_so() -> None:
    # Arrange
    d = descriptor(privacy=Privacy(mode="he", dp=DpParams(clip_norm=1.0, noise_multiplier=0.0), he=HeParams()))
    # Act / Assert
    check_descriptor(d, PrivacyPolicy(), round_spend(d))
    with pytest.raises(PolicyRefused) as refused:
        check_descriptor(d, PrivacyPolicy(allow_without_dp=False), round_spend(d))
    assert refused.value.reason == PolicyRule.NO_DP


@pytest.mark.parametrize(
    "bad", [{"max_epsilon_per_dataset": 0.0}, {"min_noise_multiplier": float("nan")}, {"max_delta": 1.0}]
)
def test_a_policy_that_means_nothing_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=f"privacy.{next(iter(bad))}"):
        PrivacyPolicy(**bad)
