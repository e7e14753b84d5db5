"""The privacy ledger: ε as opacus computes it, budgets enforced before release, durable and private on disk."""

import functools
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant

from federation.ledger import BudgetExceededError, DatasetBudget, DuplicateRoundError, LedgerError, PrivacyLedger

DELTA = 1e-5
FED = "fed-finance"
ROUND_SPEND = (1.0, 0.1, 50)


@functools.cache
def opacus_epsilon(history: tuple[tuple[float, float, int], ...], delta: float = DELTA) -> float:
    """ε of `history` straight from opacus (independent of crypto.dp)."""
    accountant = PRVAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[PrivacyLedger]:
    """A fresh ledger file."""
    with PrivacyLedger(tmp_path / "state.db") as opened:
        yield opened


def test_epsilon_matches_an_independent_opacus_computation(ledger: PrivacyLedger) -> None:
    spends = [(1.0, 0.1, 40), (1.2, 0.05, 30), (1.0, 0.1, 60)]
    for round_number, spend in enumerate(spends, start=1):
        ledger.record(FED, round_number, spend, DELTA)
    assert ledger.history(FED) == spends
    assert ledger.rounds(FED) == [1, 2, 3]
    assert ledger.spent(FED, DELTA) == pytest.approx(opacus_epsilon(tuple(spends)), rel=0.01)
    assert ledger.spent("other", DELTA) == 0.0


def test_total_composes_all_federations(ledger: PrivacyLedger) -> None:
    ledger.record(FED, 1, (1.0, 0.1, 40), DELTA)
    ledger.record("fed-law", 1, (1.0, 0.1, 60), DELTA)
    assert ledger.total(DELTA) == pytest.approx(opacus_epsilon(((1.0, 0.1, 100),)), rel=0.01)
    assert ledger.history(FED) == [(1.0, 0.1, 40)]


def test_budget_stops_exactly_before_the_round_that_would_exceed_it(ledger: PrivacyLedger) -> None:
    two, three = opacus_epsilon(((1.0, 0.1, 100),)), opacus_epsilon(((1.0, 0.1, 150),))
    budget = (two + three) / 2
    released = []
    for round_number in (1, 2, 3):
        decision = ledger.check_budget(FED, round_number, ROUND_SPEND, DELTA, budget)
        if not decision:
            assert decision.reason.startswith(f"releasing round {round_number} would spend ε=")
            assert f"> budget {budget:g}" in decision.reason
            assert decision.epsilon_after == pytest.approx(three, rel=0.01)
            break
        assert decision.epsilon_after <= budget and decision.reason == ""
        ledger.record(FED, round_number, ROUND_SPEND, DELTA, budget=budget)
        released.append(round_number)
    assert released == [1, 2]
    with pytest.raises(BudgetExceededError, match="releasing round 3 would spend"):
        ledger.record(FED, 3, ROUND_SPEND, DELTA, budget=budget)
    assert ledger.rounds(FED) == [1, 2]


def test_duplicate_round_is_refused(ledger: PrivacyLedger) -> None:
    ledger.record(FED, 1, ROUND_SPEND, DELTA)
    with pytest.raises(DuplicateRoundError, match="round 1 of 'fed-finance' is already"):
        ledger.record(FED, 1, (2.0, 0.1, 10), DELTA)
    refused = ledger.check_budget(FED, 1, ROUND_SPEND, DELTA, budget=100.0)
    assert not refused and "already released" in refused.reason
    assert ledger.history(FED) == [ROUND_SPEND]
    ledger.record("fed-law", 1, ROUND_SPEND, DELTA)  # the same round number in another federation is fine


def test_invalid_spends_are_refused(ledger: PrivacyLedger) -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        ledger.record(FED, 1, (1.0, 1.5, 1), DELTA)
    with pytest.raises(LedgerError, match="round"):
        ledger.record(FED, -1, ROUND_SPEND, DELTA)
    with pytest.raises(LedgerError, match="federation"):
        ledger.record("", 1, ROUND_SPEND, DELTA)
    with pytest.raises(LedgerError, match="budget"):
        ledger.check_budget(FED, 1, ROUND_SPEND, DELTA, budget=float("nan"))
    assert ledger.history(FED) == []


def test_file_is_private_and_history_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with PrivacyLedger(path) as ledger:
        ledger.record(FED, 1, ROUND_SPEND, DELTA)
        ledger.record(FED, 2, (1.5, 0.2, 10), DELTA)
        before = ledger.spent(FED, DELTA)
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            if (tmp_path / name).exists():
                assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    with PrivacyLedger(path) as reopened:
        assert reopened.history(FED) == [ROUND_SPEND, (1.5, 0.2, 10)]
        assert reopened.spent(FED, DELTA) == before


def test_existing_open_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    PrivacyLedger(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


DATA_A, DATA_B = "aa" * 32, "bb" * 32


def test_a_dataset_composes_every_federation_and_local_run_that_touched_it(ledger: PrivacyLedger) -> None:
    # Arrange: two federations and a local DP-SGD run on dataset A, one federation on dataset B
    limit = opacus_epsilon(((1.0, 0.1, 120),))  # room for 120 steps at (1.0, 0.1) on one dataset
    on_a = DatasetBudget(DATA_A, limit, DELTA)
    ledger.record(FED, 1, (1.0, 0.1, 50), DELTA, budget=100.0, dataset=on_a)
    ledger.record("fed-law", 1, (1.0, 0.1, 40), DELTA, budget=100.0, dataset=on_a)
    ledger.record("train:run-1", 0, (1.0, 0.1, 20), DELTA, budget=100.0, dataset=on_a)
    ledger.record("fed-law", 2, (1.0, 0.1, 50), DELTA, budget=100.0, dataset=DatasetBudget(DATA_B, limit, DELTA))
    # Act: a round of a third federation on A that fits its own budget, but not the dataset's limit
    decision = ledger.check_budget("fed-new", 1, (1.0, 0.1, 20), DELTA, 100.0, on_a)
    # Assert
    assert ledger.spent_on(DATA_A, DELTA) == pytest.approx(opacus_epsilon(((1.0, 0.1, 110),)), rel=0.01)
    assert ledger.spent_on(DATA_B, DELTA) == pytest.approx(opacus_epsilon(((1.0, 0.1, 50),)), rel=0.01)
    assert not decision and "privacy.max_epsilon_per_dataset" in decision.reason, decision
    assert ledger.check_budget("fed-new", 1, (1.0, 0.1, 10), DELTA, 100.0, on_a)  # 120 steps in all still fit
    with pytest.raises(BudgetExceededError, match="max_epsilon_per_dataset"):
        ledger.record("fed-new", 1, (1.0, 0.1, 20), DELTA, budget=100.0, dataset=on_a)
    assert ledger.datasets() == {DATA_A: [FED, "fed-law", "train:run-1"], DATA_B: ["fed-law"]}


def test_a_ledger_from_before_datasets_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    # Arrange: the table as it was (no dataset column), with one spend
    import sqlite3

    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE privacy_ledger (federation TEXT NOT NULL, round INTEGER NOT NULL, noise_multiplier REAL NOT NULL,"
        " sample_rate REAL NOT NULL, steps INTEGER NOT NULL, delta REAL NOT NULL, time REAL NOT NULL,"
        " PRIMARY KEY (federation, round)) STRICT"
    )
    conn.execute("INSERT INTO privacy_ledger VALUES ('old', 1, 1.0, 1.0, 1, 1e-5, 0.0)")
    conn.commit()
    conn.close()
    # Act
    with PrivacyLedger(path) as ledger:
        ledger.record(FED, 1, ROUND_SPEND, DELTA, dataset=DatasetBudget(DATA_A, 100.0, DELTA))
        # Assert
        assert ledger.history("old") == [(1.0, 1.0, 1)]
        assert ledger.datasets() == {"": ["old"], DATA_A: [FED]}
