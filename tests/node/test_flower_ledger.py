"""A Flower SuperNode's rounds in the node's privacy ledger, under its [privacy] policy (real ledger, real PRV)."""

from pathlib import Path

import pytest

from crypto.dp import epsilon
from crypto.statement import sha256_file
from federation.ledger import BudgetExceededError, DatasetBudget, PrivacyLedger
from federation.policy import PolicyRefused, PolicyRule
from node.core.home import NodeHome
from node.fed.flower.app.common import AppConfig
from node.fed.flower.app.ledger import check_round, open_account, record_round


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    root = tmp_path / "home"
    root.mkdir()
    return NodeHome(root)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("one paragraph\n\nanother paragraph\n")
    return path


def test_rounds_are_recorded_on_the_datasets_account_and_refused_exactly_at_the_budget(
    home: NodeHome, data: Path
) -> None:
    # Arrange: z = 1, one release per round (ε 4.39, two 6.58 at δ = 1e-5): a budget of 5 holds exactly one round
    cfg = AppConfig(noise_multiplier=1.0, clip_norm=1.0, epsilon_budget=5.0)
    one, two = epsilon([(1.0, 1.0, 1)], 1e-5), epsilon([(1.0, 1.0, 2)], 1e-5)
    assert one < 5.0 < two
    account = open_account(home, data, "127.0.0.1:9092/7", cfg)
    # Act: round 1 is checked and recorded; round 2 would take the run past its budget
    check_round(account, 1, cfg)
    record_round(account, 1, cfg)
    # Assert
    with pytest.raises(BudgetExceededError, match="privacy budget"):
        check_round(account, 2, cfg)
    with PrivacyLedger(home.state_db) as ledger:
        assert ledger.spent(account.key, 1e-5) == pytest.approx(one)
        assert ledger.datasets() == {sha256_file(data): [account.key]}


def test_a_p2p_spend_on_the_same_data_counts_against_a_flower_run(home: NodeHome, data: Path) -> None:
    # Arrange: the dataset already spent 3 rounds of a P2P federation at z = 1 (node limit: ε 10 per dataset)
    with PrivacyLedger(home.state_db) as ledger:
        on = DatasetBudget(sha256_file(data), 10.0, 1e-5)
        for r in (1, 2, 3):
            ledger.record("f" * 64, r, (1.0, 1.0, 1), 1e-5, dataset=on)
    cfg = AppConfig(noise_multiplier=1.0, epsilon_budget=8.0)
    account = open_account(home, data, "link:9092/1", cfg)
    # Act / Assert: the run's own budget is untouched, but the dataset's would pass 10
    assert epsilon([(1.0, 1.0, 4)], 1e-5) > 10.0
    with pytest.raises(BudgetExceededError, match="dataset"):
        check_round(account, 1, cfg)


@pytest.mark.parametrize(
    ("policy", "cfg", "rule"),
    [
        ("min_noise_multiplier = 0.8", AppConfig(noise_multiplier=0.5), PolicyRule.NOISE_TOO_WEAK),
        ("allow_without_dp = false", AppConfig(noise_multiplier=0.0), PolicyRule.NO_DP),
        ("", AppConfig(noise_multiplier=1.0, epsilon_budget=50.0), PolicyRule.BUDGET_TOO_LARGE),
        ("", AppConfig(noise_multiplier=1.0, delta=1e-3), PolicyRule.DELTA_TOO_LARGE),
        ("max_epsilon_per_round = 2.0", AppConfig(noise_multiplier=1.0), PolicyRule.ROUND_EPSILON_TOO_LARGE),
    ],
)
def test_a_run_that_breaks_the_nodes_policy_is_refused_naming_the_rule(
    home: NodeHome, data: Path, policy: str, cfg: AppConfig, rule: PolicyRule
) -> None:
    home.config_file.write_text(f"[privacy]\n{policy}\n")
    with pytest.raises(PolicyRefused) as info:
        open_account(home, data, "link:9092/3", cfg)
    assert info.value.reason is rule and "Flower run link:9092/3" in str(info.value)
    assert not home.state_db.exists() or PrivacyLedger(home.state_db).datasets() == {}
