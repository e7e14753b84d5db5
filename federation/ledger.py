"""The privacy ledger: every differentially private release of this node, per federation and round (SQLite).

Order of operations for a DP round: `check_budget` -> `record` -> release. A spend is recorded BEFORE the update
leaves the node, so a crash between the two over-counts (safe) and never under-counts; `record(..., budget=B)`
repeats the budget check inside the same write transaction, so two threads cannot both pass a check and together
exceed the budget. The connection uses WAL with synchronous=FULL: a committed spend survives a power loss.

ε comes from crypto.dp.epsilon (opacus PRV accountant) over the federation's history [(z, q, T)], one entry per
round. Every entry also names the dataset it touched (the sha256 of the data file; '' when unknown): a dataset's ε
composes everything that touched it, every round of every federation and every local DP-SGD run, and a release is
refused when it would take either its federation past the federation's budget or its dataset past the node's
(`DatasetBudget`). `total` composes the histories of ALL entries as one sequence of mechanisms on the same data: the
conservative (basic sequential) composition, correct whatever data each federation used, and loose if they trained
on disjoint data.

One connection per instance and per thread (sqlite3's default same-thread check): create a ledger in each thread.
The file is created with mode 0600, and tightened to 0600 if it was group/world accessible.
"""

import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from crypto.dp import Spend, epsilon, merge_history
from crypto.files import private_file

TABLE = "privacy_ledger"
_MAX_FEDERATION_CHARS = 256
_BUSY_TIMEOUT_S = 10.0

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    federation TEXT NOT NULL CHECK (length(federation) > 0),
    round INTEGER NOT NULL CHECK (round >= 0),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 1),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    time REAL NOT NULL,
    dataset TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (federation, round)
) STRICT
"""
_ADD_DATASET = f"ALTER TABLE {TABLE} ADD COLUMN dataset TEXT NOT NULL DEFAULT ''"  # ledgers from before issue 15


class LedgerError(ValueError):
    """A ledger operation refused; the message says why."""


class DuplicateRoundError(LedgerError):
    """A round of a federation that is already in the ledger."""


class BudgetExceededError(LedgerError):
    """Recording a spend that would take the federation over its ε budget, or its dataset over the node's."""


@dataclass(frozen=True)
class DatasetBudget:
    """The dataset a release comes from (sha256 of its file) and the most ε the node lets it spend, at `delta`."""

    digest: str
    epsilon: float
    delta: float


@dataclass(frozen=True)
class BudgetDecision:
    """Whether the next release fits the budget: ε before and after it, and the reason for a refusal."""

    allowed: bool
    epsilon_before: float
    epsilon_after: float
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed


def _check_federation(federation: str) -> None:
    """Refuse an empty, non-text or overlong federation id."""
    if not isinstance(federation, str) or not 0 < len(federation) <= _MAX_FEDERATION_CHARS:
        raise LedgerError(f"federation must be a non-empty string of at most {_MAX_FEDERATION_CHARS} characters")


def _check_round(round: int) -> None:
    """Refuse a round that is not an integer >= 0."""
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise LedgerError(f"round must be an integer >= 0, got {round!r}")


def _check_budget_value(budget: float) -> None:
    """Refuse a budget that is not a finite number >= 0."""
    if not (isinstance(budget, int | float) and math.isfinite(budget) and budget >= 0):
        raise LedgerError(f"budget must be a finite ε >= 0, got {budget!r}")


class PrivacyLedger:
    """The ε spent by this node's DP releases, per federation and round, in an SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        private_file(self.path)
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(_SCHEMA)
        columns = {row[1] for row in self._conn.execute(f"PRAGMA table_info({TABLE})")}
        if "dataset" not in columns:
            self._conn.execute(_ADD_DATASET)

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def __enter__(self) -> "PrivacyLedger":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def history(self, federation: str) -> list[Spend]:
        """The federation's spends [(z, q, T)], by round."""
        _check_federation(federation)
        rows = self._conn.execute(
            f"SELECT noise_multiplier, sample_rate, steps FROM {TABLE} WHERE federation = ? ORDER BY round",
            (federation,),
        ).fetchall()
        return [Spend(*row) for row in rows]

    def dataset_history(self, digest: str) -> list[Spend]:
        """Every spend on the dataset `digest` (rounds of all federations, local runs), in time order."""
        rows = self._conn.execute(
            f"SELECT noise_multiplier, sample_rate, steps FROM {TABLE} WHERE dataset = ? ORDER BY time", (digest,)
        ).fetchall()
        return [Spend(*row) for row in rows]

    def datasets(self) -> dict[str, list[str]]:
        """Each dataset digest ('' : unknown) with the federations (or local runs) that spent on it."""
        found: dict[str, list[str]] = {}
        rows = self._conn.execute(f"SELECT DISTINCT dataset, federation FROM {TABLE} ORDER BY dataset, federation")
        for dataset, federation in rows:
            found.setdefault(dataset, []).append(federation)
        return found

    def spent_on(self, digest: str, delta: float) -> float:
        """ε spent so far on the dataset `digest` at `delta`."""
        return epsilon(self.dataset_history(digest), delta)

    def rounds(self, federation: str) -> list[int]:
        """The rounds recorded for the federation, ascending."""
        _check_federation(federation)
        rows = self._conn.execute(f"SELECT round FROM {TABLE} WHERE federation = ? ORDER BY round", (federation,))
        return [int(row[0]) for row in rows]

    def spent(self, federation: str, delta: float) -> float:
        """ε spent so far in the federation at `delta` (0.0 if nothing was released)."""
        return epsilon(self.history(federation), delta)

    def total(self, delta: float) -> float:
        """ε over all federations, composed as one sequence (conservative: assumes they share data)."""
        rows = self._conn.execute(f"SELECT noise_multiplier, sample_rate, steps FROM {TABLE} ORDER BY time").fetchall()
        return epsilon([Spend(*row) for row in rows], delta)

    def check_budget(
        self,
        federation: str,
        round: int,
        next_spend: Sequence[float],
        delta: float,
        budget: float,
        dataset: DatasetBudget | None = None,
    ) -> BudgetDecision:
        """Decide, before releasing `round`, whether its spend keeps the federation's ε within `budget` (and the
        dataset's within the node's limit)."""
        _check_round(round)
        _check_budget_value(budget)
        return self._decide(federation, round, merge_history([next_spend])[0], delta, budget, dataset)

    def _decide(
        self,
        federation: str,
        round: int,
        spend: Spend,
        delta: float,
        budget: float,
        dataset: DatasetBudget | None = None,
    ) -> BudgetDecision:
        """The budget decision from the current history (call inside a transaction to make it binding)."""
        history = self.history(federation)
        before = epsilon(history, delta)
        if self._has_round(federation, round):
            return BudgetDecision(False, before, before, f"round {round} of {federation!r} was already released")
        after = epsilon([*history, spend], delta)
        if after > budget:
            reason = (
                f"releasing round {round} would spend ε={after:.4g} > budget {budget:g} "
                f"(federation {federation!r}: ε={before:.4g} spent so far, δ={delta:g})"
            )
            return BudgetDecision(False, before, after, reason)
        if dataset is not None and dataset.digest:
            _check_budget_value(dataset.epsilon)
            on_data = self.dataset_history(dataset.digest)
            data_after = epsilon([*on_data, spend], dataset.delta)
            if data_after > dataset.epsilon:
                reason = (
                    f"releasing round {round} of {federation!r} would take dataset {dataset.digest[:12]}… to "
                    f"ε={data_after:.4g} > privacy.max_epsilon_per_dataset {dataset.epsilon:g} "
                    f"(ε={epsilon(on_data, dataset.delta):.4g} spent on it so far by {len(on_data)} entries, "
                    f"δ={dataset.delta:g})"
                )
                return BudgetDecision(False, before, after, reason)
        return BudgetDecision(True, before, after)

    def _has_round(self, federation: str, round: int) -> bool:
        """True if (federation, round) is already recorded."""
        row = self._conn.execute(
            f"SELECT 1 FROM {TABLE} WHERE federation = ? AND round = ?", (federation, round)
        ).fetchone()
        return row is not None

    def record(
        self,
        federation: str,
        round: int,
        spend: Sequence[float],
        delta: float,
        *,
        budget: float | None = None,
        now: float | None = None,
        dataset: DatasetBudget | None = None,
    ) -> None:
        """Record a release atomically, on `dataset`'s account; with `budget`, refuse it (BudgetExceededError) if it
        would exceed it or the dataset's limit."""
        _check_federation(federation)
        _check_round(round)
        z, q, steps = merge_history([spend])[0]
        if not (isinstance(delta, float) and 0 < delta < 1):
            raise LedgerError(f"delta must be a float in (0, 1), got {delta!r}")
        if budget is not None:
            _check_budget_value(budget)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._insert(federation, round, Spend(z, q, steps), delta, budget, now, dataset)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _insert(
        self,
        federation: str,
        round: int,
        spend: Spend,
        delta: float,
        budget: float | None,
        now: float | None,
        dataset: DatasetBudget | None,
    ) -> None:
        """Check for a duplicate (and the budgets), then insert; runs inside the write transaction."""
        if self._has_round(federation, round):
            raise DuplicateRoundError(f"round {round} of {federation!r} is already in the privacy ledger")
        if budget is not None:
            decision = self._decide(federation, round, spend, delta, budget, dataset)
            if not decision:
                raise BudgetExceededError(decision.reason)
        self._conn.execute(
            f"INSERT INTO {TABLE} (federation, round, noise_multiplier, sample_rate, steps, delta, time, dataset) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (federation, round, *spend, delta, time.time() if now is None else now, dataset.digest if dataset else ""),
        )
