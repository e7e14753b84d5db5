"""One ε account per dataset across everything that touched it (3 real daemons, example-level dp): a local
`mirador train --dp` run and federation rounds compose on the data file's account, the round that would pass the
node's limit is refused before training, and a second federation on the same data sees the first one's spend."""

import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.dp import epsilon
from crypto.statement import sha256_file
from tests.daemon_harness import Daemon
from tests.node.fed_daemons import (
    cli,
    create_and_join,
    daemons,
    federations,
    restart,
    wait_for,
    write_data,
)

pytestmark = pytest.mark.slow  # three daemons, a local DP-SGD run, three rounds

DEADLINE_S = 60
LIMIT_ENV = "MIRADOR_PRIVACY_MAX_EPSILON_PER_DATASET"
SMALL = ["--batch-size", "2", "--max-length", "32"]  # the ledger is under test, not learning: small steps


@pytest.fixture
def three(tmp_path: Path, torch_base_folder: Path) -> Iterator[list[Daemon]]:
    with daemons(tmp_path, torch_base_folder, 3) as nodes:
        yield nodes


def history_on(home: Path, digest: str) -> list[tuple[float, float, int]]:
    """The (z, q, steps) of every spend on the dataset `digest`, read from the node's ledger itself."""
    with sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT noise_multiplier, sample_rate, steps FROM privacy_ledger WHERE dataset = ? ORDER BY time",
            (digest,),
        ).fetchall()
    return [(float(z), float(q), int(t)) for z, q, t in rows]


def status_of(d: Daemon, name: str) -> dict:
    return next(f for f in federations(d) if f["name"] == name)["status"]


def test_a_dataset_budget_spans_local_runs_and_federations(three: list[Daemon], tmp_path: Path) -> None:
    # Arrange: B first trains locally with DP-SGD on its data file
    data = [write_data(tmp_path / f"{t}.txt", t, i) for i, t in enumerate(["bees", "sails", "bread"])]
    a, b, _ = three
    local = cli(
        b, "train", "--data", str(data[1]), "--adapter", "mine", "--steps", "3", "--dp", "--epsilon", "3", *SMALL
    )
    assert local.returncode == 0, local.stderr
    digest = sha256_file(data[1])
    before = history_on(b.home, digest)
    assert len(before) == 1  # the local run, on its data file's account
    # B's limit on the file: its local run and two rounds of 2 DP-SGD steps (z = 1, q = 2/22) fit, a third does not
    one_round = (1.0, 2 / 22, 2)
    two, three_rounds = epsilon([*before, one_round, one_round], 1e-5), epsilon([*before, *[one_round] * 3], 1e-5)
    limit = (two + three_rounds) / 2
    budget = math.floor(limit * 1e4) / 1e4  # a federation may allow at most the node's limit
    b.stop()
    three[1] = b = restart(b, {LIMIT_ENV: f"{limit:.6f}"})
    # Act: a federation with the budget B's policy allows; A, B and C train in it
    fid = create_and_join(three, data, "dp", deadline_s=DEADLINE_S, quorum=2, budget=budget)
    wait_for(lambda: "budget_refused" in status_of(b, "club"), 6 * DEADLINE_S, "B's refused round")
    # Assert: B released two rounds (it may have sat one out while the others started), refused its third before
    # training; its file's ε is PRV over the local run and those two rounds
    refused = status_of(b, "club")["budget_refused"]
    assert refused["round"] >= 3 and "dataset" in refused["reason"], refused
    after = history_on(b.home, digest)
    assert after == [*before, one_round, one_round]
    datasets = {d["dataset"]: d for d in cli_json(b)["datasets"]}
    assert datasets[digest]["epsilon_spent"] == pytest.approx(two, rel=0.02)
    assert datasets[digest]["epsilon_spent"] <= limit < epsilon([*after, one_round], 1e-5)
    assert sorted(datasets[digest]["spent_by"])[0] == fid  # the federation and the local run (train:...)
    # Act: a second federation on the same file, whose own budget is untouched
    other = write_data(tmp_path / "stars.txt", "stars", 7)
    create_and_join([a, b], [other, data[1]], "dp", deadline_s=DEADLINE_S, quorum=2, budget=budget, name="club2")
    wait_for(lambda: "budget_refused" in status_of(b, "club2"), 4 * DEADLINE_S, "B's refusal in club2")
    # Assert: it sees the first one's spend: every round B is asked into would pass the file's limit, so it releases
    # nothing (a round it refused fails quorum and the next one is refused too: the status shows the latest refusal)
    refused = status_of(b, "club2")["budget_refused"]
    assert refused["round"] >= 1 and "dataset" in refused["reason"] and "by 3 entries" in refused["reason"], refused
    assert history_on(b.home, digest) == after


def cli_json(d: Daemon) -> dict:
    import json

    out = cli(d, "federation", "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
