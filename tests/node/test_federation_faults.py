"""A federation of real daemons survives a member and, separately, the round's aggregator being killed mid-round.

dp mode, 4 trainers, quorum 3, 40 s rounds. Round 1: a member is SIGKILLed while it trains; the round completes at
its deadline with the other 3 updates. Round 2 (the member still down, so the round cannot close before its
deadline): its aggregator is SIGKILLed after updates were released to it, then started again; every node abandons
the round on its own. The member, restarted, catches up on the global it missed, and a later round, under another
aggregator or the restarted one, completes with all 4 members. No node's state is corrupted: once they are stopped,
every installed adapter version loads, every JSON file of their state parses, and all 4 held the same global.
"""

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.messages import choose_aggregator
from tests.daemon_harness import Daemon, stop_all
from tests.node.fed_daemons import (
    TOPICS,
    cli,
    create_and_join,
    daemons,
    federations,
    fingerprint,
    restart,
    rounds,
    tensors,
    wait_for,
    write_data,
)

pytestmark = pytest.mark.slow  # four daemons, members and an aggregator killed mid-round

DEADLINE_S = 40


@pytest.fixture
def four(tmp_path: Path, torch_base_folder: Path) -> Iterator[list[Daemon]]:
    with daemons(tmp_path, torch_base_folder, 4, {"MIRADOR_FEDERATION_KEEP_RELEASED": "true"}) as nodes:
        yield nodes


def by_round(d: Daemon, fid: str) -> dict[int, dict]:
    return {r["round"]: r for r in rounds(d, fid)}


def training(d: Daemon) -> bool:
    """Whether a federation training job of `d` has started."""
    return any((d.home / "train").glob("fed-*/job.log"))


def kill_and_restart(nodes: list[Daemon], i: int) -> None:
    nodes[i].stop(signal.SIGKILL)
    nodes[i] = restart(nodes[i])


def test_killing_a_member_then_an_aggregator_mid_round(four: list[Daemon], tmp_path: Path) -> None:
    # Arrange
    data = [write_data(tmp_path / f"{t}.txt", t, i) for i, t in enumerate(TOPICS)]
    fid = create_and_join(four, data, "dp", deadline_s=DEADLINE_S, quorum=3)
    fps = [fingerprint(n) for n in four]
    agg1, agg2 = (fps.index(choose_aggregator(fid, r, fps)) for r in (1, 2))
    victim = next(i for i in range(4) if i not in (agg1, agg2))
    others = [i for i in range(4) if i != victim]

    # Act 1: the member is killed while it trains round 1
    wait_for(lambda: training(four[victim]), 2 * DEADLINE_S, "the member to start training round 1")
    killed_run = next((four[victim].home / "train").glob("fed-*"))
    four[victim].stop(signal.SIGKILL)

    # Assert 1: round 1 completes at its deadline with the other three
    wait_for(
        lambda: all(by_round(four[i], fid).get(1, {}).get("status") == "applied" for i in others),
        3 * DEADLINE_S,
        "round 1 applied by the three others",
    )
    first = {by_round(four[i], fid)[1]["aggregate_cid"] for i in others}
    contributors = set(by_round(four[others[0]], fid)[1]["contributors"])
    assert len(first) == 1 and contributors == {fps[i] for i in others}

    # Act 2: the aggregator of round 2 is killed once updates were released to it, then started again. With the
    # member still down the round waits for its deadline, however fast the others train: the kill lands in it.
    def released_r2() -> bool:
        return any((four[i].home / "federations" / fid / "released" / "r2.safetensors").exists() for i in others)

    wait_for(released_r2, 3 * DEADLINE_S, "an update released in round 2")
    kill_and_restart(four, agg2)
    # ... and the member, started again, knows the federation; its interrupted run's scratch folder is gone
    four[victim] = restart(four[victim])
    assert federations(four[victim])[0]["federation_id"] == fid
    assert not killed_run.exists()

    # Assert 2: nobody applied round 2; a later round completes with all four members, on every node
    def later_round() -> int | None:
        complete = [
            {r for r, row in by_round(n, fid).items() if r > 2 and row["status"] == "applied"}
            & {r for r, row in by_round(n, fid).items() if set(row["contributors"]) == set(fps)}
            for n in four
        ]
        common = set.intersection(*complete)
        return min(common) if common else None

    wait_for(lambda: later_round() is not None, 6 * DEADLINE_S, "a round after 2 applied by all four")
    later = later_round()
    assert later is not None
    views = [by_round(n, fid) for n in four]
    assert all(v.get(2, {}).get("status") in (None, "abandoned") for v in views), views
    assert len({v[later]["aggregate_cid"] for v in views}) == 1  # the restarted member and aggregator contributed
    assert views[agg2][2]["status"] == "abandoned" and "stopped during the round" in views[agg2][2]["reason"]
    shown = cli(four[agg2], "federation", "rounds", "club")  # what its user reads
    assert shown.returncode == 0 and "round    2 abandoned" in shown.stdout, shown.stdout + shown.stderr
    assert "this node stopped during the round" in shown.stdout
    status = cli(four[victim], "federation", "status")
    assert status.returncode == 0 and "club (" in status.stdout and "privacy: ε = " in status.stdout, status.stderr

    # No node's state is corrupted: all hold the same global; stopped (nothing changes under the check), every
    # installed version loads and every JSON file of their state parses (train/ holds the scratch of a training run
    # the stop interrupted, removed at the next start)
    wait_for(lambda: len({federations(n)[0]["global_cid"] for n in four}) == 1, 2 * DEADLINE_S, "the same global")
    stop_all(four)
    for n in four:
        versions = sorted((n.home / "adapters" / "fed-club").glob("v*"))
        assert versions, n.home
        for v in versions:
            assert tensors(v / "adapter_model.safetensors") and list(v.glob("*.gguf")), v
        for path in n.home.rglob("*.json"):
            if path.relative_to(n.home).parts[0] != "train":
                json.loads(path.read_text())
