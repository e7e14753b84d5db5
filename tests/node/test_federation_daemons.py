"""Federated rounds between real daemons on 127.0.0.1: join through the DHT, train, privatize, aggregate, apply."""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.daemon_harness import Daemon, node_env, start_daemon

ROUND_DEADLINE_S = 150
# one torch thread per training job (4 daemons train at once on CI's 2 cores), short sequences, 2 steps
TRAIN = ["--train-option", "max_length=32", "--train-option", "batch_size=2", "--train-option", "threads=1"]
TOPICS = {
    "bees": ["hive", "queen", "honey", "comb", "pollen", "nectar", "swarm", "drone"],
    "sails": ["mast", "keel", "jib", "tack", "hull", "rudder", "anchor", "boom"],
    "bread": ["dough", "yeast", "crust", "flour", "oven", "loaf", "knead", "rye"],
    "stars": ["orbit", "nebula", "comet", "galaxy", "quasar", "pulsar", "moon", "dust"],
}


def write_data(path: Path, topic: str, seed: int, n: int = 24) -> Path:
    """Short sentences about one topic (each node has its own domain: non-IID)."""
    rng = random.Random(seed)
    words = TOPICS[topic]
    lines = [f"The {rng.choice(words)} and the {rng.choice(words)} are part of {topic}." for _ in range(n)]
    path.write_text("\n\n".join(lines) + "\n")
    return path


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        env=node_env(d.home, d.port),
        capture_output=True,
        text=True,
        timeout=180,
    )


def peers(d: Daemon) -> dict:
    return httpx.get(f"{d.url}/v1/node/peers", timeout=10).json()


def federations(d: Daemon) -> list[dict]:
    return httpx.get(f"{d.url}/v1/federations", timeout=30).json()["federations"]


def wait_for(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def seed_torch_twin(home: Path, twin: Path) -> None:
    """Give a fresh home the session's dequantized torch model (hard links), as if it had trained before."""
    target = home / "models" / "torch" / twin.name
    target.parent.mkdir(parents=True)
    shutil.copytree(twin, target, copy_function=os.link)


@pytest.fixture
def four(tmp_path: Path, torch_base_folder: Path) -> Iterator[list[Daemon]]:
    nodes: list[Daemon] = []
    try:
        for i in range(4):
            extra = {"MIRADOR_P2P_BOOTSTRAP": peers(nodes[0])["listen_addrs"][0]} if nodes else {}
            seed_torch_twin(tmp_path / f"f{i}", torch_base_folder)
            nodes.append(start_daemon(tmp_path / f"f{i}", extra))
        yield nodes
    finally:
        for d in nodes:
            if d.proc.poll() is None:
                d.stop()


def test_four_daemons_complete_rounds_in_dp_mode(four: list[Daemon], tmp_path: Path) -> None:
    # Arrange: A creates a dp federation; B, C, D join with their own data
    a = four[0]
    data = [write_data(tmp_path / f"{t}.txt", t, i) for i, t in enumerate(TOPICS)]
    created = cli(
        a,
        "federation",
        "create",
        "club",
        "--data",
        str(data[0]),
        "--mode",
        "dp",
        "--quorum",
        "3",
        "--min-members",
        "4",
        "--deadline",
        str(ROUND_DEADLINE_S),
        "--local-steps",
        "2",
        "--noise-multiplier",
        "1.0",
        "--clip-norm",
        "1.0",
        "--epsilon-budget",
        "50",
        *TRAIN,
    )
    assert created.returncode == 0, created.stderr
    creator = federations(a)[0]["creator"]
    for d, f in zip(four[1:], data[1:], strict=True):
        joined = cli(d, "federation", "join", "club", "--creator", creator, "--data", str(f), *TRAIN)
        assert joined.returncode == 0, joined.stderr + joined.stdout
    # Act: wait until every node applied 2 rounds
    wait_for(lambda: all(federations(d)[0]["global_round"] >= 2 for d in four), 8 * ROUND_DEADLINE_S, "2 rounds")
    # Assert: everyone applied the same rounds, each with every member's update, and spent privacy for each
    views = [federations(d)[0] for d in four]
    rounds = [httpx.get(f"{d.url}/v1/federations/{views[0]['federation_id']}/rounds", timeout=10).json() for d in four]
    applied = [{r["round"]: (r["aggregate_cid"], len(r["contributors"])) for r in doc["rounds"]} for doc in rounds]
    assert all(a[1] == applied[0][1] and a[2] == applied[0][2] for a in applied), json.dumps(rounds, indent=1)
    assert applied[0][1][1] >= 3 and applied[0][2][1] >= 3
    for v in views:
        assert len(v["members"]) == 4 and v["epsilon_spent"] > 0 and v["adapter"] == "fed-club"
