"""Federated rounds between real daemons on 127.0.0.1: join through the DHT, train, privatize, aggregate, apply."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
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
            extra = {"MIRADOR_FEDERATION_KEEP_RELEASED": "true"}
            if nodes:
                extra["MIRADOR_P2P_BOOTSTRAP"] = peers(nodes[0])["listen_addrs"][0]
            seed_torch_twin(tmp_path / f"f{i}", torch_base_folder)
            nodes.append(start_daemon(tmp_path / f"f{i}", extra))
        yield nodes
    finally:
        for d in nodes:  # every one is stopped, even if another did not stop in time
            if d.proc.poll() is None:
                try:
                    d.stop()
                except subprocess.TimeoutExpired:
                    d.stop(signal.SIGKILL)


def tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}


@pytest.mark.parametrize("mode", ["dp", "he", "he+dp"])
def test_four_daemons_complete_three_rounds(mode: str, four: list[Daemon], tmp_path: Path) -> None:
    # Arrange: A creates the federation; B and C join as members; D as a member (dp) or aggregator-only (he modes)
    a, d = four[0], four[3]
    rounds_wanted = 3
    data = [write_data(tmp_path / f"{t}.txt", t, i) for i, t in enumerate(TOPICS)]
    he = mode != "dp"
    trainers = four[:3] if he else four
    noise = ["--noise-multiplier", "1.0"] if mode != "he" else []
    created = cli(
        a,
        "federation",
        "create",
        "club",
        "--data",
        str(data[0]),
        "--mode",
        mode,
        "--quorum",
        "3",
        "--min-members",
        str(len(trainers)),
        "--deadline",
        str(ROUND_DEADLINE_S),
        "--local-steps",
        "2",
        "--clip-norm",
        "1.0",
        "--epsilon-budget",
        "100",
        *noise,
        *TRAIN,
    )
    assert created.returncode == 0, created.stderr
    creator = federations(a)[0]["creator"]
    for node, f in zip(four[1:], data[1:], strict=True):
        role = ["--role", "aggregator"] if he and node is d else ["--data", str(f), *TRAIN]
        joined = cli(node, "federation", "join", "club", "--creator", creator, *role)
        assert joined.returncode == 0, joined.stderr + joined.stdout
    # Act
    wait_for(
        lambda: all(federations(n)[0]["global_round"] >= rounds_wanted for n in four),
        (rounds_wanted + 2) * ROUND_DEADLINE_S,
        f"{rounds_wanted} rounds",
    )
    # Assert: every node saw the same aggregates, each made of every trainer's update
    views = [federations(n)[0] for n in four]
    fid = views[0]["federation_id"]
    docs = [httpx.get(f"{n.url}/v1/federations/{fid}/rounds", timeout=10).json() for n in four]
    done = [{r["round"]: (r["aggregate_cid"], len(r["contributors"])) for r in doc["rounds"]} for doc in docs]
    for r in range(1, rounds_wanted + 1):
        assert {x[r] for x in done} == {done[0][r]} and done[0][r][1] == len(trainers), json.dumps(docs, indent=1)
    for v, node in zip(views, four, strict=True):
        assert len(v["members"]) == 4
        assert (v["epsilon_spent"] > 0) == (mode != "he" and node in trainers)  # only released updates cost ε
        status = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()["federations"][0]
        assert status["global_round"] >= rounds_wanted
        if v["epsilon_spent"] > 0:  # the status shows the ledger's ε as of the last release
            assert status["epsilon_spent"] == pytest.approx(v["epsilon_spent"], rel=1e-3)
    if he:
        # The aggregator-only node aggregated every round and never held the secret key
        aggregator = views[3]
        assert not aggregator["he_secret_here"] and not list((d.home / "federations").rglob("he_secret.bin"))
        assert {r["aggregator"] for r in docs[0]["rounds"]} == {creator_of(d)}
        assert all(v["he_secret_here"] for v in views[:3])
    # The applied global moved by the mean of what the trainers released (decrypted CKKS sum / n under HE)
    from node.fed_adapter import initial_adapter
    from node.models import embedded_model_path

    start = initial_adapter(embedded_model_path(), 4, 8.0, ["q_proj", "v_proj"], seed=fid)
    first = tensors(a.home / "adapters" / "fed-club" / "v1" / "adapter_model.safetensors")
    released = [tensors(n.home / "federations" / fid / "released" / "r1.safetensors") for n in trainers]
    for name, value in first.items():
        mean = np.mean([rel[name] for rel in released], axis=0)
        scale = max(np.abs(mean).max(), 1e-12)
        assert np.abs((value - start[name]) - mean).max() <= 1e-5 * scale, name


def creator_of(d: Daemon) -> str:
    return str(httpx.get(f"{d.url}/v1/node/status", timeout=10).json()["node"]["identity"])
