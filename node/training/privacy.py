"""Local DP-SGD runs in the privacy ledger: a dataset's ε composes every run and every federation round on it."""

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from crypto.statement import sha256_file
from federation.ledger import DatasetBudget, PrivacyLedger
from node.core.home import NodeHome
from node.training.runner import TrainRun

FEEDBACK_DATASET = "feedback"  # the ledger's name for the node's feedback, trained on as one growing dataset


def record_local_run(
    home: NodeHome, run: TrainRun, result: Mapping[str, Any], data: Path | None, dataset: str | None = None
) -> bool:
    """Put a finished DP-SGD run's spend (z, q, steps; from its training `result`) in the ledger on its dataset's
    account (`dataset` when given, else the data file's sha256, or the node's feedback as one dataset); False for a
    run without DP, which claims no ε."""
    z, q, steps, delta = (result.get(k) for k in ("noise_multiplier", "sample_rate", "steps", "delta"))
    if not (isinstance(z, float) and isinstance(q, float) and isinstance(steps, int) and isinstance(delta, float)):
        return False
    digest = dataset or (sha256_file(data) if data is not None else FEEDBACK_DATASET)
    with PrivacyLedger(home.state_db) as ledger:
        on = DatasetBudget(digest, 1e6, delta)  # recorded, not limited: the run has happened
        ledger.record(f"train:{run.id}", 0, (z, q, steps), delta, dataset=on)
    return True


def ledger_account(
    home: NodeHome, data: Path | None, dataset: str | None = None
) -> Callable[[TrainRun, Mapping[str, Any]], None]:
    """The `account` hook of `run_training`: records the run's spend before its adapter is installed."""

    def account(run: TrainRun, result: Mapping[str, Any]) -> None:
        record_local_run(home, run, result, data, dataset)

    return account
