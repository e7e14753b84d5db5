"""Personalities through a real daemon: keyword routing, headers, hot reload of adapters and manifest, refusals."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from node.adapters.check import BaseDims, base_dims_of_file
from node.adapters.store import AdapterStore
from node.inference.models import embedded_model_path
from tests.daemon_harness import Daemon, node_env, running
from tests.lora_files import strong_adapters, write_adapter

MANIFEST = """
[personalities.financial_expert]
base = "smollm2-135m-instruct"
adapter = "finance"
load_on = ["budget", "investment", "tax return"]

[personalities.chef]
base = "base"
adapters = { cooking = 1.0, finance = 0.5 }
load_on = ["recipe", "dinner"]
"""


@pytest.fixture(scope="module")
def dims() -> BaseDims:
    return base_dims_of_file(embedded_model_path())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, dims: BaseDims) -> dict[str, Path]:
    return strong_adapters(tmp_path_factory.mktemp("adapter-files"), dims, ["finance", "cooking", "finance2"])


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, dims: BaseDims, files: dict[str, Path]) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("pnode") / "home"
    store = AdapterStore(home / "adapters", dims)
    store.install("finance", files["finance"])
    store.install("cooking", files["cooking"])
    (home / "personalities.toml").write_text(MANIFEST)
    yield from running(home)


def ask(node: Daemon, content: str, model: str = "auto") -> tuple[str, str, str, dict[str, Any]]:
    """(answer, personality header, adapters header, body) of a greedy 12-token chat."""
    client = OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=12, temperature=0
    )
    body = raw.parse()
    text = body.choices[0].message.content or ""
    return text, raw.headers["x-mirador-personality"], raw.headers["x-mirador-adapters"], body.model_dump()


@pytest.mark.parametrize(
    ("message", "model", "personality", "adapters"),
    [
        ("How should I plan my BUDGET for next year?", "auto", "financial_expert", "finance@v1"),
        (
            "Help me with my tax return and a recipe for my investment club dinner",
            "auto",
            "financial_expert",
            "finance@v1",
        ),
        ("A recipe for dinner, please", "auto", "chef", "cooking@v1,finance@v1"),
        # no keyword ('tax return' needs both words, in order): the personality closest in meaning answers
        ("Tell me about the tax system", "auto", "financial_expert", "finance@v1"),
        ("What should we cook tonight?", "auto", "chef", "cooking@v1,finance@v1"),
        ("Name three colours of the rainbow", "auto", "base", "none"),  # close to no personality
        ("Hello there", "smollm2-135m-instruct", "base", "none"),
        ("What is a budget?", "base", "base", "none"),
        ("Hello there", "base:cooking", "base:cooking", "cooking@v1"),
        ("Hello there", "chef", "chef", "cooking@v1,finance@v1"),
    ],
)
def test_routing_names_who_answered(node: Daemon, message: str, model: str, personality: str, adapters: str) -> None:
    # Act
    _, header, adapters_header, body = ask(node, message, model)
    # Assert
    assert header == personality and body["personality"] == personality
    assert adapters_header == adapters
    keyword = any(w in message.lower() for w in ("budget", "tax return", "investment", "recipe", "dinner"))
    by_meaning = model == "auto" and personality != "base" and not keyword
    assert (body.get("route") or {}).get("by") == ("meaning" if by_meaning else None)
    if by_meaning:
        assert body["route"]["similarity"] >= 0.3  # [memory] route_similarity


def test_a_personality_answers_with_its_adapter(node: Daemon) -> None:
    # Arrange
    message = "Where should my investment go?"
    # Act
    routed, *_ = ask(node, message)
    direct, *_ = ask(node, message, "base:finance")
    base, *_ = ask(node, message, "base")
    # Assert
    assert routed == direct
    assert routed != base


def test_streamed_answers_carry_the_personality(node: Daemon) -> None:
    client = OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with client.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": "my budget"}], max_tokens=4, stream=True
    ) as response:
        assert response.headers["x-mirador-personality"] == "financial_expert"
        chunks = list(response.parse())
    assert chunks and all(c.model_extra and c.model_extra["personality"] == "financial_expert" for c in chunks)


def test_unknown_models_and_adapters_get_404(node: Daemon) -> None:
    r1 = node.chat(model="nobody")
    r2 = node.chat(model="base:nope")
    assert r1.status_code == 404 and r1.json()["error"]["code"] == "model_not_found"
    assert "financial_expert" in r1.json()["error"]["message"]
    assert r2.status_code == 404 and r2.json()["error"]["code"] == "adapter_not_found"
    assert "nope" in r2.json()["error"]["message"]


def test_models_lists_the_personalities(node: Daemon) -> None:
    data = httpx.get(f"{node.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in data] == ["smollm2-135m-instruct", "financial_expert", "chef"]
    assert data[2]["personality"]["adapters"] == {"cooking": 1.0, "finance": 0.5}


def cli(node: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = node_env(node.home, node.port)
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda f, t, d: truncated(f["finance2"], t / "cut.gguf"), "truncated"),
        (lambda f, t, d: write_adapter(t / "wide.gguf", d, n_embd=d.n_embd * 2), "hidden size or architecture"),
        (lambda f, t, d: write_adapter(t / "qwen.gguf", d, arch="qwen2"), "architecture 'qwen2'"),
        (lambda f, t, d: (t / "adapter.bin").write_bytes(b"\x80\x04fake pickle") and t / "adapter.bin", "pickle"),
    ],
    ids=["truncated", "hidden-size", "architecture", "pickle"],
)
def test_a_bad_adapter_is_refused_and_the_old_one_keeps_serving(
    node: Daemon, tmp_path: Path, files: dict[str, Path], dims: BaseDims, make: Any, reason: str
) -> None:
    # Arrange
    before, _, adapters_before, _ = ask(node, "my budget")
    bad = make(files, tmp_path, dims)
    # Act
    result = cli(node, "adapter", "add", "finance", str(bad))
    # Assert
    assert result.returncode == 1 and reason in result.stderr, result.stderr
    after, _, adapters_after, _ = ask(node, "my budget")
    assert (after, adapters_after) == (before, adapters_before)
    assert not [p for p in (node.home / "adapters" / "finance").iterdir() if p.name.startswith(".")]


def test_a_new_version_and_a_new_manifest_serve_without_restart(node: Daemon, files: dict[str, Path]) -> None:
    # Arrange
    v1_text, _, v1_adapters, _ = ask(node, "my budget")
    manifest = node.home / "personalities.toml"
    # Act: install v2 with the CLI; add a personality; then break the manifest
    added = cli(node, "adapter", "add", "finance", str(files["finance2"]))
    v2_text, _, v2_adapters, _ = ask(node, "my budget")
    manifest.write_text(MANIFEST + '\n[personalities.poet]\nbase = "base"\nadapter = "cooking"\nload_on = ["poem"]\n')
    _, poet, _, _ = ask(node, "write a poem")
    manifest.write_text(MANIFEST + "\n[personalities.broken]\nbase = 3\n")
    _, still_poet, _, _ = ask(node, "write a poem")
    status = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()
    rolled_back = cli(node, "adapter", "use", "finance", "v1")
    v1_again, _, v1_again_adapters, _ = ask(node, "my budget")
    manifest.write_text(MANIFEST)
    # Assert
    assert added.returncode == 0 and "finance@v2" in added.stdout
    assert (v1_adapters, v2_adapters) == ("finance@v1", "finance@v2") and v2_text != v1_text
    assert poet == still_poet == "poet"
    assert "broken" in status["personalities"]["error"] and "poet" in status["personalities"]["names"]
    assert rolled_back.returncode == 0 and (v1_again, v1_again_adapters) == (v1_text, "finance@v1")
    assert {e["key"] for e in status["adapters"]["cache"]["loaded"]} >= {"finance@v2"}
