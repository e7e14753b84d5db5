"""Running chains (node.chains): a published chain over two personalities and a pulled adapter runs through the
`openai` client, streamed and whole, gives the text its steps give one by one, and refuses to run when an artifact it
references no longer verifies."""

import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from marketplace.chain import parse_chain, render
from node.adapters.check import base_dims_of_file
from node.adapters.store import AdapterStore
from node.inference.models import embedded_model_path
from tests.daemon_harness import Daemon, run_cli, running
from tests.lora_files import strong_adapters, write_adapter

CHAIN = textwrap.dedent(
    """
    name: brief
    version: 1.0.0
    description: three steps over two personalities and a pulled adapter
    steps:
      - personality: financial_expert
        prompt: "Name one way to save money on {input}."
      - personality: chef
        prompt: "Turn this into a cooking tip: {previous}"
      - model: tutor@1.0.0
        prompt: "Explain to a child: {previous}"
    """
)
MANIFEST = """
[personalities.financial_expert]
base = "base"
adapter = "finance"

[personalities.chef]
base = "base"
adapter = "cooking"
"""
GREEDY: dict[str, Any] = {"max_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("chains")
    home = root / "home"
    dims = base_dims_of_file(embedded_model_path())
    (root / "files").mkdir()
    files = strong_adapters(root / "files", dims, ["finance", "cooking"])
    store = AdapterStore(home / "adapters", dims)
    store.install("finance", files["finance"])
    store.install("cooking", files["cooking"])
    (home / "personalities.toml").write_text(MANIFEST)
    for d in running(home):
        tutor = root / "tutor"
        tutor.mkdir()
        write_adapter(tutor / "adapter.gguf", dims, r=8, seed=3, std=0.05)
        store.install("tutor", tutor / "adapter.gguf")  # the same file, to run the last step by hand
        published = [
            run_cli(
                home,
                d.port,
                "model",
                "publish",
                str(tutor),
                "--name",
                "tutor",
                "--version",
                "1.0.0",
                "--kind",
                "adapter",
            ),
        ]
        (root / "brief.yaml").write_text(CHAIN)
        published.append(run_cli(home, d.port, "chain", "publish", str(root / "brief.yaml")))
        for done in published:
            assert done.returncode == 0, done.stderr
        yield d


def client_of(node: Daemon) -> OpenAI:
    return OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_chain_runs_streamed_and_whole_and_equals_its_steps_run_one_by_one(node: Daemon) -> None:
    # Arrange
    client = client_of(node)
    ask = [{"role": "user", "content": "groceries"}]
    # Act: the chain, whole and streamed
    whole = client.chat.completions.create(model="chain:brief", messages=ask, **GREEDY)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model="chain:brief", messages=ask, stream=True, **GREEDY))  # type: ignore[arg-type]
    # Act: the same steps by hand (the pulled adapter's file is also in the adapter store as `tutor`)
    chain = parse_chain(CHAIN, "brief.yaml")
    previous: str | None = None
    by_hand = []
    for step, model in zip(chain.steps, ["financial_expert", "chef", "base:tutor"], strict=True):
        message = {"role": "user", "content": render(step, "groceries", previous)}
        reply = client.chat.completions.create(model=model, messages=[message], **GREEDY)  # type: ignore[list-item]
        previous = (reply.choices[0].message.content or "").strip()
        by_hand.append(reply.choices[0].message.content or "")
    # Assert: two reported steps, then the final text; the same whole or streamed; the steps match by hand
    extra = whole.model_extra or {}
    steps = extra["steps"]
    assert [s["by"] for s in steps] == ["financial_expert", "chef"]
    assert [s["adapters"] for s in steps] == [["finance@v1"], ["cooking@v1"]]
    assert [s["text"] for s in steps] == [t.strip() for t in by_hand[:2]]
    assert extra["personality"] == "chain:brief@1.0.0" and whole.choices[0].message.content == by_hand[2]
    streamed_steps = [c.model_extra["chain_step"] for c in chunks if c.model_extra and "chain_step" in c.model_extra]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [s["text"] for s in streamed_steps] == [s["text"] for s in steps] and text == by_hand[2]
    assert whole.usage is not None and whole.usage.completion_tokens > sum(s["completion_tokens"] for s in steps)


def test_a_chain_whose_adapter_no_longer_verifies_does_not_run_and_says_which(node: Daemon) -> None:
    # Arrange: one byte of the pulled adapter's file changes on disk
    gguf = node.home / "artifacts" / "tutor" / "1.0.0" / "adapter.gguf"
    original = gguf.read_bytes()
    gguf.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        # Act
        resp = httpx.post(
            f"{node.url}/v1/chat/completions",
            json={"model": "chain:brief", "messages": [{"role": "user", "content": "rent"}], "max_tokens": 4},
            timeout=60,
        )
    finally:
        gguf.write_bytes(original)
    missing = httpx.post(
        f"{node.url}/v1/chat/completions",
        json={"model": "chain:nope", "messages": [{"role": "user", "content": "rent"}], "max_tokens": 4},
        timeout=60,
    )
    odd = httpx.post(
        f"{node.url}/v1/chat/completions",
        json={"model": "chain:" + "X" * 5000, "messages": [{"role": "user", "content": "rent"}], "max_tokens": 4},
        timeout=60,
    )
    # Assert
    assert odd.status_code == 404 and "is not a chain name" in odd.json()["error"]["message"]
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "chain_refused"
    assert "tutor@1.0.0 does not verify" in resp.json()["error"]["message"]
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


def test_the_chain_file_is_not_a_personality(node: Daemon) -> None:
    # Act: a chain model with tools is refused before anything runs
    resp = httpx.post(
        f"{node.url}/v1/chat/completions",
        json={
            "model": "chain:brief",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        timeout=60,
    )
    # Assert
    assert resp.status_code == 400 and "chain answers in text" in resp.json()["error"]["message"]


def test_the_cli_runs_a_chain_and_shows_its_steps(node: Daemon) -> None:
    # Act
    done = run_cli(
        node.home, node.port, "chain", "run", "brief", "groceries", "--max-tokens", "16", "--temperature", "0"
    )
    whole = client_of(node).chat.completions.create(
        model="chain:brief", messages=[{"role": "user", "content": "groceries"}], **GREEDY
    )
    # Assert: the final text on stdout, each finished step on stderr
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (whole.choices[0].message.content or "").strip()
    assert "[step 1: financial_expert" in done.stderr and "[step 2: chef" in done.stderr
