"""Helpers for tests that run federations between real daemons on 127.0.0.1."""

import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.daemon_harness import Daemon, node_env, spawn_daemon, stop_all, wait_ready

# one torch thread per training job (4 daemons train at once on CI's 2 cores), short sequences
TRAIN = [
    *("--train-option", "max_length=32", "--train-option", "batch_size=2", "--train-option", "threads=1"),
    *("--train-option", "anchor_samples=8"),  # the personal adapters' anchor: 8 texts instead of 64
]
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
    """Run `mirador ARGS` against daemon `d`."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        env=node_env(d.home, d.port),
        capture_output=True,
        text=True,
        timeout=180,
    )


def peers(d: Daemon) -> dict[str, Any]:
    """The daemon's /v1/node/peers."""
    return httpx.get(f"{d.url}/v1/node/peers", timeout=10).json()


def federations(d: Daemon) -> list[dict[str, Any]]:
    """The daemon's federations as /v1/federations lists them."""
    return httpx.get(f"{d.url}/v1/federations", timeout=30).json()["federations"]


def rounds(d: Daemon, fid: str) -> list[dict[str, Any]]:
    """The daemon's rounds of federation `fid`, newest first."""
    return httpx.get(f"{d.url}/v1/federations/{fid}/rounds", timeout=10).json()["rounds"]


def fingerprint(d: Daemon) -> str:
    """The daemon's identity fingerprint."""
    return str(httpx.get(f"{d.url}/v1/node/status", timeout=10).json()["node"]["identity"])


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` each second until it holds; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def seed_torch_twin(home: Path, twin: Path) -> None:
    """Give a fresh home the session's dequantized torch model (hard links), as if it had trained before."""
    target = home / "models" / "torch" / twin.name
    target.parent.mkdir(parents=True)
    shutil.copytree(twin, target, copy_function=os.link)


# create_and_join's federations spend ε ≤ 100 in all, up to 5.6 per round (z = 1 under he+dp at quorum 3): a policy
# that allows it.
POLICY_ENV = {"MIRADOR_PRIVACY_MAX_EPSILON_PER_DATASET": "100", "MIRADOR_PRIVACY_MAX_EPSILON_PER_ROUND": "10"}


@contextmanager
def daemons(tmp_path: Path, twin: Path, n: int, env: dict[str, str] | None = None) -> Iterator[list[Daemon]]:
    """n daemons bootstrapped from the first (started together); every one is stopped at the end, even one that
    was restarted (replace it in the list) or that does not stop in time."""
    nodes: list[Daemon] = []
    env = POLICY_ENV | (env or {})
    try:
        for i in range(n):
            seed_torch_twin(tmp_path / f"f{i}", twin)
        nodes.append(wait_ready(spawn_daemon(tmp_path / "f0", env)))
        extra = (env or {}) | {"MIRADOR_P2P_BOOTSTRAP": peers(nodes[0])["listen_addrs"][0]}
        for i in range(1, n):  # one by one: a failed spawn leaves the started ones in `nodes`, to be stopped
            nodes.append(spawn_daemon(tmp_path / f"f{i}", extra))
        for d in nodes[1:]:
            wait_ready(d)
        yield nodes
    finally:
        stop_all(nodes)


def restart(d: Daemon, changes: dict[str, str] | None = None) -> Daemon:
    """Start the daemon of `d`'s home again (same environment but `changes`, a fresh API port) after it stopped or
    was killed."""
    assert d.proc.poll() is not None, "stop the daemon first"
    extra = {k: v for k, v in d.env.items() if k.startswith("MIRADOR_") and k != "MIRADOR_API_PORT"}
    return wait_ready(spawn_daemon(d.home, extra | (changes or {})))


def tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as float64 arrays."""
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}


def create_and_join(
    nodes: list[Daemon],
    data: list[Path],
    mode: str,
    *,
    deadline_s: int,
    quorum: int,
    aggregator_only: Daemon | None = None,
    noise: float | None = 1.0,
    personal: bool = False,
    budget: float = 100.0,
    name: str = "club",
    lora: str = "ab",
    updates: str = "f32",
) -> str:
    """nodes[0] creates federation `name` (2 local steps, C = 1, ε `budget`); the others join through it, each
    with its own data, `aggregator_only` as an aggregator without data; members train personal adapters only with
    `personal`; `lora`: ab or ffa; `updates`: f32 or q8. Returns the federation id."""
    no_personal = [] if personal else ["--no-personal"]
    a = nodes[0]
    trainers = [n for n in nodes if n is not aggregator_only]
    created = cli(
        a,
        "federation",
        "create",
        name,
        "--data",
        str(data[0]),
        "--mode",
        mode,
        "--quorum",
        str(quorum),
        "--min-members",
        str(len(trainers)),
        "--deadline",
        str(deadline_s),
        "--local-steps",
        "2",
        "--clip-norm",
        "1.0",
        "--epsilon-budget",
        str(budget),
        *(["--noise-multiplier", str(noise)] if noise is not None else []),
        *TRAIN,
        *no_personal,
        "--lora",
        lora,
        "--updates",
        updates,
    )
    assert created.returncode == 0, created.stderr
    view = next(f for f in federations(a) if f["name"] == name)
    for node, f in zip(nodes[1:], data[1:], strict=True):
        role = ["--role", "aggregator"] if node is aggregator_only else ["--data", str(f), *TRAIN, *no_personal]
        joined = cli(node, "federation", "join", name, "--creator", view["creator"], *role)
        assert joined.returncode == 0, joined.stderr + joined.stdout
    return str(view["federation_id"])
