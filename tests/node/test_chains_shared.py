"""A chain published on one daemon is pulled by another over libp2p, with the adapter it references, and runs there
(real daemons on 127.0.0.1, the embedded block stores)."""

import subprocess
import textwrap
import time
from collections.abc import Iterator

import httpx
import pytest

from node.adapters.check import base_dims_of_file
from node.inference.models import embedded_model_path
from tests.daemon_harness import Daemon, run_cli, start_daemon, stop_all
from tests.lora_files import write_adapter

pytestmark = pytest.mark.slow  # two daemons and a pull over libp2p

CHAIN = textwrap.dedent(
    """
    name: solo
    version: 1.0.0
    steps:
      - model: tutor@1.0.0
        prompt: "List two facts about {input}."
      - model: tutor@1.0.0
        prompt: "Make this shorter: {previous}"
    """
)


def cli(d: Daemon, *args: str) -> "subprocess.CompletedProcess[str]":
    return run_cli(d.home, d.port, *args, timeout=180)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon]]:
    root = tmp_path_factory.mktemp("shared-chain")
    nodes: list[Daemon] = []
    try:
        nodes.append(start_daemon(root / "a"))
        bootstrap = httpx.get(f"{nodes[0].url}/v1/node/peers", timeout=10).json()["listen_addrs"][0]
        nodes.append(start_daemon(root / "b", {"MIRADOR_P2P_BOOTSTRAP": bootstrap}))
        yield nodes[0], nodes[1]
    finally:
        stop_all(nodes)


def run(d: Daemon, chain: str) -> httpx.Response:
    body = {"model": chain, "messages": [{"role": "user", "content": "owls"}], "max_tokens": 12, "temperature": 0}
    return httpx.post(f"{d.url}/v1/chat/completions", json=body, timeout=120)


def test_a_chain_published_on_a_is_pulled_with_its_adapter_and_runs_on_b(pair: tuple[Daemon, Daemon]) -> None:
    # Arrange: A publishes an adapter and a chain that uses it
    a, b = pair
    tutor = a.home.parent / "tutor"
    tutor.mkdir()
    write_adapter(tutor / "adapter.gguf", base_dims_of_file(embedded_model_path()), r=8, seed=5, std=0.05)
    (a.home.parent / "solo.yaml").write_text(CHAIN)
    for args in (
        ("model", "publish", str(tutor), "--name", "tutor", "--version", "1.0.0", "--kind", "adapter"),
        ("chain", "publish", str(a.home.parent / "solo.yaml")),
    ):
        done = cli(a, *args)
        assert done.returncode == 0, done.stderr
        assert "announced" in done.stdout, done.stderr
    before = run(b, "chain:solo")
    deadline = time.monotonic() + 60  # the DHT record reaches B's view (bounded)
    while cli(b, "chain", "search", "solo").returncode != 0 and time.monotonic() < deadline:
        time.sleep(1)
    # Act: B pulls the chain (and with it the adapter) from A, then runs it
    pulled = cli(b, "chain", "pull", "solo", "--trust-publisher")
    untrusted = run(b, "chain:solo")  # accepted for the pull only: running needs trust
    exported = cli(a, "keys", "export", "--public", str(a.home.parent / "a.pem"))
    trusted = cli(b, "trust", "add", str(a.home.parent / "a.pem"), "--label", "a")
    on_b, on_a = run(b, "chain:solo"), run(a, "chain:solo")
    # Assert
    assert before.status_code == 404 and before.json()["error"]["code"] == "chain_refused"
    assert pulled.returncode == 0, pulled.stderr
    assert untrusted.status_code == 404 and "is not trusted" in untrusted.json()["error"]["message"]
    assert exported.returncode == 0 and trusted.returncode == 0, exported.stderr + trusted.stderr
    assert on_b.status_code == 200, on_b.text
    steps = on_b.json()["steps"]
    assert [s["adapters"] for s in steps] == [["tutor@1.0.0"]]
    assert on_b.json()["choices"][0]["message"]["content"] == on_a.json()["choices"][0]["message"]["content"]
    assert steps == [dict(s, seconds=steps[0]["seconds"]) for s in on_a.json()["steps"]]
