"""Training through a running daemon and the CLI: progress, install as a new version, served without restart."""

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.inference.models import embedded_model_path
from node.training.base_model import torch_base_dir
from tests.daemon_harness import Daemon, node_env, running

pytestmark = pytest.mark.slow  # training through a daemon

TOPICS = ["budget", "savings", "rent", "groceries", "insurance", "pension"]
DP_SMALL = ["--dp", "--epsilon", "8", "--batch-size", "4"]  # the ledger is under test, not learning: small steps


def corpus(n: int) -> str:
    """Generated one-domain paragraphs (household money notes)."""
    return "\n\n".join(
        f"Note {i}: this month the {TOPICS[i % 6]} came to {100 + 17 * i} dollars, "
        f"so I moved {10 + i} dollars from {TOPICS[(i + 2) % 6]} to {TOPICS[(i + 4) % 6]}."
        for i in range(n)
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, torch_base_folder: Path) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("tnode") / "home"
    cached = torch_base_dir(home / "models", embedded_model_path())
    cached.parent.mkdir(parents=True)
    cached.symlink_to(torch_base_folder)  # the session's dequantized base: no second 15 s conversion
    yield from running(home)


def wait_done(node: Daemon, run_id: str, timeout: float = 240) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{node.url}/v1/train/{run_id}", timeout=10).json()
        seen.append(state)
        if state["status"] in ("done", "failed", "stopped"):
            return state, seen
        time.sleep(0.5)
    raise AssertionError(f"training {run_id} did not finish in {timeout} s: {seen[-1]}")


def chat(node: Daemon, model: str, content: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=60)


def test_api_training_installs_a_new_version_that_serves_at_once(node: Daemon, tmp_path: Path) -> None:
    # Arrange
    data = node.home / "data" / "notes.txt"  # the API reads data under MIRADOR_HOME/data only
    data.parent.mkdir(exist_ok=True)
    data.write_text(corpus(40))
    # Act
    auth = node.auth
    started = httpx.post(
        f"{node.url}/v1/train", json={"adapter": "notes", "data": str(data), "steps": 6}, headers=auth, timeout=10
    )
    busy = httpx.post(f"{node.url}/v1/train", json={"adapter": "other", "data": str(data)}, headers=auth, timeout=10)
    final, seen = wait_done(node, started.json()["id"])
    reply = chat(node, "base:notes", "What did the rent cost?")
    # Assert
    assert started.status_code == 202 and started.headers["location"] == f"/v1/train/{started.json()['id']}"
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "training_busy"
    assert final["status"] == "done" and final["version"] == "v1", final
    assert any(s["status"] == "running" and 0 < s["step"] < s["steps"] for s in seen) or final["step"] == 6
    result = final["result"]
    assert result["heldout_loss_after"] < result["heldout_loss_before"]
    assert reply.status_code == 200 and reply.headers["x-mirador-adapters"] == "notes@v1"
    stored = node.home / "adapters" / "notes" / "v1"
    assert sorted(p.name for p in stored.iterdir()) == [
        "adapter.gguf",
        "adapter_config.json",
        "adapter_model.safetensors",
        "training.json",
    ]


def test_feedback_trains_the_next_version(node: Daemon) -> None:
    # Arrange: two answers, one corrected and one rated well
    first = chat(node, "base", "How much did groceries cost?").json()
    second = chat(node, "base", "Say hello").json()
    for body in (
        {"completion_id": first["id"], "correction": "Groceries came to 185 dollars."},
        {"completion_id": second["id"], "rating": 5},
    ):
        assert httpx.post(f"{node.url}/v1/feedback", json=body, headers=node.auth, timeout=10).status_code == 200
    # Act
    started = httpx.post(
        f"{node.url}/v1/train",
        json={"adapter": "notes", "from_feedback": True, "steps": 3},
        headers=node.auth,
        timeout=10,
    )
    final, _ = wait_done(node, started.json()["id"])
    # Assert
    assert final["status"] == "done" and final["version"] == "v2" and final["examples"] == 2, final
    examples = (node.home / "train" / final["id"] / "examples.jsonl").read_text().splitlines()
    assert json.loads(examples[0])["messages"][-1] == {
        "role": "assistant",
        "content": "Groceries came to 185 dollars.",
    }
    assert chat(node, "base:notes", "hi").headers["x-mirador-adapters"] == "notes@v2"


def test_cli_dp_training_reports_and_records_epsilon(node: Daemon, tmp_path: Path) -> None:
    # Arrange
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in corpus(30).split("\n\n")))
    env = node_env(node.home, node.port)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args], env=env, capture_output=True, text=True, timeout=300
        )

    # Act
    trained = cli("train", "--data", str(data), "--adapter", "private", "--steps", "4", *DP_SMALL)
    listed = cli("adapter", "list", "--json")
    ledger = json.loads(cli("federation", "status", "--json").stdout)["datasets"]
    bad = cli("train", "--data", str(tmp_path / "missing.txt"), "--adapter", "x")
    # Assert
    assert trained.returncode == 0, trained.stderr
    assert "installed private@v1" in trained.stdout and "ε = " in trained.stdout
    epsilon = {row["name"]: row["epsilon"] for row in json.loads(listed.stdout)}["private"]
    assert 0 < epsilon <= 8.0 + 1e-6
    # the run is in the privacy ledger, on the account of this data file (where federation rounds compose with it)
    on_data = [d for d in ledger if d["dataset"] == hashlib.sha256(data.read_bytes()).hexdigest()]
    assert len(on_data) == 1 and len(on_data[0]["spent_by"]) == 1 and on_data[0]["spent_by"][0].startswith("train:")
    assert on_data[0]["epsilon_spent"] == pytest.approx(epsilon, rel=0.02)
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_a_dp_run_the_ledger_cannot_record_installs_nothing(tmp_path: Path, torch_base_folder: Path) -> None:
    # Arrange: a home whose ledger cannot be opened (state.db is a folder: sqlite refuses it)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "models").symlink_to(torch_base_folder.parent.parent)
    (home / "state.db").mkdir(mode=0o700)
    data = tmp_path / "notes.txt"
    data.write_text(corpus(30))
    # Act
    args = ["train", "--data", str(data), "--adapter", "private", "--steps", "2", *DP_SMALL]
    trained = subprocess.run(
        [sys.executable, "-m", "node.cli", *args, "--max-length", "32"],
        env=node_env(home, 1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Assert: the run fails, says why, and no adapter whose ε is not in the ledger serves
    assert trained.returncode == 1 and "privacy ledger" in trained.stderr, trained.stderr
    assert not (home / "adapters" / "private").exists() or not any((home / "adapters" / "private").iterdir())
