"""A node's [privacy] policy against a real creator: a federation whose signed rules break it is not joined, and the
refusal names the rule (issue 15). Two real daemons on 127.0.0.1; the creator's own policy allows what it creates."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, spawn_daemon, stop_all, wait_ready
from tests.node.fed_daemons import cli, federations, fingerprint, peers, write_data

pytestmark = pytest.mark.slow  # two daemons

# The creator's policy allows the example: z = 0.001 with a budget of 10^6 (ε ≈ 550,000 per round)
LAX = {
    "MIRADOR_PRIVACY_MIN_NOISE_MULTIPLIER": "0.001",
    "MIRADOR_PRIVACY_MAX_EPSILON_PER_DATASET": "1000000",
    "MIRADOR_PRIVACY_MAX_EPSILON_PER_ROUND": "1000000",
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon]]:
    """(creator with a lax policy, joiner with the default policy), connected."""
    tmp = tmp_path_factory.mktemp("policy")
    nodes: list[Daemon] = []
    try:
        nodes.append(wait_ready(spawn_daemon(tmp / "creator", LAX)))
        nodes.append(
            wait_ready(spawn_daemon(tmp / "joiner", {"MIRADOR_P2P_BOOTSTRAP": peers(nodes[0])["listen_addrs"][0]}))
        )
        yield nodes[0], nodes[1]
    finally:
        stop_all(nodes)


def create(d: Daemon, tmp_path: Path, name: str, *args: str) -> str:
    data = write_data(tmp_path / f"{name}.txt", "bees", seed=1)
    created = cli(d, "federation", "create", name, "--data", str(data), "--min-members", "2", *args)
    assert created.returncode == 0, created.stderr
    return next(f["federation_id"] for f in federations(d) if f["name"] == name)


@pytest.mark.parametrize(
    ("name", "rules", "refusal"),
    [
        ("weak", ["--mode", "dp-user", "--noise-multiplier", "0.001", "--epsilon-budget", "1000000"], "noise_too_weak"),
        ("lavish", ["--noise-multiplier", "1.0", "--epsilon-budget", "50"], "budget_too_large"),
    ],
)
def test_a_federation_that_breaks_the_local_policy_is_not_joined(
    pair: tuple[Daemon, Daemon], tmp_path: Path, name: str, rules: list[str], refusal: str
) -> None:
    # Arrange
    creator, joiner = pair
    fid = create(creator, tmp_path, name, *rules)
    data = write_data(tmp_path / "mine.txt", "bread", seed=2)
    # Act
    joined = cli(joiner, "federation", "join", name, "--creator", fingerprint(creator), "--data", str(data))
    # Assert
    assert joined.returncode != 0
    assert refusal in joined.stderr and "privacy." in joined.stderr, joined.stderr
    assert [f["name"] for f in federations(joiner)] == [], "nothing of the federation was stored"
    members = next(f["members"] for f in federations(creator) if f["federation_id"] == fid)
    assert len(members) == 1, "the creator never saw a join request"


def test_the_default_policy_also_refuses_to_create_such_a_federation(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    # Arrange
    _, node = pair
    data = write_data(tmp_path / "mine.txt", "bread", seed=3)
    # Act
    created = cli(node, "federation", "create", "weak", "--data", str(data), "--noise-multiplier", "0.001")
    # Assert
    assert created.returncode != 0 and "noise_too_weak" in created.stderr, created.stderr
    assert federations(node) == []


def test_a_user_level_federation_whose_noise_would_drown_its_updates_is_not_created(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    # Arrange: z = 1, q,v rank 4 on SmolLM2-135M: 30 layers × 4 × ((576 + 576) + (576 + 192)) = 230,400 parameters,
    # so the mean of 4 members' updates holds noise ≈ √(230,400 / 4) = 240× a clipped update
    creator, _ = pair
    data = write_data(tmp_path / "mine.txt", "bees", seed=4)
    args = ["federation", "create", "crowd", "--data", str(data), "--mode", "dp-user", "--min-members", "4"]
    # Act
    small = cli(creator, *args)
    needed = re.search(r"needs about (\d+) members", small.stderr)
    told = cli(creator, *args, "--expected-members", needed.group(1) if needed else "0")
    # Assert
    assert small.returncode != 0 and "would be 240× a clipped update" in small.stderr, small.stderr
    assert needed is not None and int(needed.group(1)) == 230_400  # z² · d at a ratio of 1
    assert told.returncode == 0, told.stderr
    assert [f["mode"] for f in federations(creator) if f["name"] == "crowd"] == ["dp-user"]
