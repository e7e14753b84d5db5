"""A SuperNode's privacy account: the same ledger, budget and policy as the P2P path, for Flower runs.

A member of a Flower run releases its update to the SuperLink in plaintext, clipped to C and noised with
N(0, (z·C)²) once per round: user-level DP (the unit of privacy is everything the member trained on in that round;
add/remove adjacency, sensitivity C), one Gaussian release per round, Spend(z, q = 1, 1 step). Before a round's
training starts, the node's `[privacy]` policy (its `node.toml` in the home the node config names) is checked
against the run's z, δ and ε budget, and the ledger against the run's budget and the dataset's limit (the data file's
sha256: the same account as its P2P rounds and local `train --dp` runs). The spend is recorded after training, before
the reply leaves. A run without noise releases nothing DP: the policy's `allow_without_dp` decides.
"""

from dataclasses import dataclass
from pathlib import Path

import msgspec

from crypto.dp import Spend
from crypto.statement import sha256_file
from federation.ledger import BudgetExceededError, DatasetBudget, PrivacyLedger
from federation.policy import PrivacyPolicy, check_release
from node.core.config import load_config
from node.core.home import NodeHome
from node.fed.flower.app.common import AppConfig

LEDGER_PREFIX = "flower:"  # ledger key of a run: flower:<SuperLink address>/<run id>


@dataclass(frozen=True)
class RunAccount:
    """One Flower run's account on this SuperNode: its ledger key, the node's policy, the dataset's budget."""

    ledger: Path
    key: str
    policy: PrivacyPolicy
    dataset: DatasetBudget
    spend: Spend | None  # per round; None: the run releases updates without noise


def open_account(home: NodeHome, data: Path, run: str, cfg: AppConfig) -> RunAccount:
    """The account of run `run` (SuperLink address and run id) training on `data`; PolicyRefused naming the rule
    when the run's settings break the node's policy."""
    section = load_config(home.config_file).privacy
    policy = PrivacyPolicy(**msgspec.structs.asdict(section))
    spend = Spend(cfg.noise_multiplier, 1.0, 1) if cfg.noise_multiplier > 0 else None
    check_release(
        f"Flower run {run}",
        policy,
        spend,
        cfg.noise_multiplier,
        cfg.delta,
        cfg.epsilon_budget,
        None if spend else "with noise-multiplier 0 (no DP)",
    )
    dataset = DatasetBudget(sha256_file(data), policy.max_epsilon_per_dataset, policy.max_delta)
    return RunAccount(home.state_db, f"{LEDGER_PREFIX}{run}", policy, dataset, spend)


def check_round(account: RunAccount, r: int, cfg: AppConfig) -> None:
    """Refuse (BudgetExceededError) a round whose release would take the run past its ε budget or the dataset past
    the node's limit, before anything is trained."""
    if account.spend is None:
        return
    with PrivacyLedger(account.ledger) as ledger:
        decision = ledger.check_budget(account.key, r, account.spend, cfg.delta, cfg.epsilon_budget, account.dataset)
    if not decision.allowed:
        raise BudgetExceededError(f"privacy budget: {decision.reason}")


def record_round(account: RunAccount, r: int, cfg: AppConfig) -> None:
    """Record round r's release (checked again inside the transaction) before the update leaves."""
    if account.spend is None:
        return
    with PrivacyLedger(account.ledger) as ledger:
        ledger.record(account.key, r, account.spend, cfg.delta, budget=cfg.epsilon_budget, dataset=account.dataset)
