"""The marketplace CLI between two node homes that share a real IPFS daemon (js-ipfs on 127.0.0.1)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from node.adapters.check import base_dims_of_file
from node.inference.models import embedded_model_path
from tests.ipfs_daemon import IpfsDaemon
from tests.lora_files import write_adapter

pytestmark = pytest.mark.slow  # two homes, a daemon and an IPFS daemon


def cli(home: Path, ipfs: IpfsDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "MIRADOR_HOME": str(home),
        "MIRADOR_STORE_BACKEND": "ipfs",
        "MIRADOR_STORE_IPFS_API": ipfs.api_multiaddr,
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def published_cid(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    match = re.search(r"^published .* as (\S+)$", result.stdout, re.MULTILINE)
    assert match, result.stdout
    return match.group(1)


@pytest.fixture
def adapter_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "finance"
    folder.mkdir()
    write_adapter(folder / "adapter.gguf", base_dims_of_file(embedded_model_path()), r=4)
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"]})
    )
    return folder


def test_publish_trust_pull_verify_and_chain_across_two_homes(
    tmp_path: Path, ipfs: IpfsDaemon, adapter_folder: Path
) -> None:
    # Arrange
    alice, bob, carol = tmp_path / "alice", tmp_path / "bob", tmp_path / "carol"
    adapter_cid = published_cid(
        cli(
            alice,
            ipfs,
            "model",
            "publish",
            str(adapter_folder),
            "--name",
            "finance",
            "--version",
            "1.0.0",
            "--kind",
            "adapter",
        )
    )
    chain = tmp_path / "brief.yaml"
    chain.write_text("name: brief\nversion: 1.0.0\nsteps:\n  - model: finance@1.0.0\n    prompt: 'Sum up: {input}'\n")
    chain_cid = published_cid(cli(alice, ipfs, "chain", "publish", str(chain)))
    assert cli(alice, ipfs, "keys", "export", "--public", str(tmp_path / "alice.pem")).returncode == 0
    stranger = tmp_path / "carol-notes"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("hello")
    carol_cid = published_cid(
        cli(carol, ipfs, "model", "publish", str(stranger), "--name", "notes", "--version", "1.0.0")
    )
    # Act
    trusted = cli(bob, ipfs, "trust", "add", str(tmp_path / "alice.pem"), "--label", "alice")
    pulled_chain = cli(bob, ipfs, "chain", "pull", chain_cid)
    listed = json.loads(cli(bob, ipfs, "model", "list", "--json").stdout)
    verified = cli(bob, ipfs, "model", "verify", "finance@1.0.0")
    inspected = json.loads(cli(bob, ipfs, "model", "inspect", "finance").stdout)
    untrusted = cli(bob, ipfs, "model", "pull", carol_cid)
    allowed = cli(bob, ipfs, "model", "pull", carol_cid, "--trust-publisher")
    audit = cli(bob, ipfs, "audit").stdout
    # Assert
    assert trusted.returncode == 0 and pulled_chain.returncode == 0, pulled_chain.stderr
    assert [(r["name"], r["kind"]) for r in listed] == [("finance", "adapter")]
    assert listed[0]["root_cid"] == adapter_cid
    assert verified.returncode == 0 and "2 files" in verified.stdout
    assert inspected["manifest"]["adapter"]["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}
    assert inspected["manifest"]["benchmarks"]["generation_tok_s"] > 0  # measured with the adapter at publish
    assert untrusted.returncode == 1 and "is not trusted" in untrusted.stderr
    assert allowed.returncode == 0 and "UNTRUSTED publisher" in allowed.stdout
    assert (bob / "artifacts" / "brief" / "1.0.0" / "brief.yaml").is_file()
    assert re.search(r"pull\s+refused", audit) and re.search(r"trust-add\s+ok", audit)


def test_an_adapter_published_by_one_home_is_pulled_and_served_by_another(tmp_path: Path, ipfs: IpfsDaemon) -> None:
    # Arrange: alice publishes a strong adapter (its greedy answers differ from the base's)
    import httpx

    from tests.daemon_harness import running

    alice, bob = tmp_path / "alice", tmp_path / "bob"
    folder = tmp_path / "tutor"
    folder.mkdir()
    write_adapter(folder / "adapter.gguf", base_dims_of_file(embedded_model_path()), r=8, seed=1, std=0.1)
    training = {"losses": [4.1, 3.9], "heldout_loss_after": 3.5, "epsilon": 7.9, "delta": 1e-5}
    (folder / "training.json").write_text(json.dumps(training))  # per-step losses on alice's own data
    publish = cli(alice, ipfs, "model", "publish", str(folder), "--name", "tutor", "--version=1.0.0", "--kind=adapter")
    cid = published_cid(publish)
    cli(alice, ipfs, "keys", "export", "--public", str(tmp_path / "alice.pem"))
    cli(bob, ipfs, "trust", "add", str(tmp_path / "alice.pem"))
    # Act
    pulled = cli(bob, ipfs, "model", "pull", cid)
    answers = {}
    for daemon in running(bob):
        for model in ("base", "base:tutor"):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 8,
                "temperature": 0,
            }
            reply = httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=60)
            answers[model] = (reply.headers["x-mirador-adapters"], reply.json()["choices"][0]["message"]["content"])
    # Assert
    assert pulled.returncode == 0, pulled.stderr
    assert "installed as adapter tutor@v1" in pulled.stdout
    assert "training.json (per-step losses on your data) is not published" in publish.stdout
    installed = bob / "artifacts" / "tutor" / "1.0.0"
    assert sorted(p.name for p in installed.iterdir()) == ["adapter.gguf", "envelope.json"]
    assert "measured at publish: generation_tok_s" in publish.stdout and "heldout_loss" not in publish.stdout
    assert "epsilon 7.9" in publish.stdout
    assert answers["base:tutor"][0] == "tutor@v1" and answers["base"][0] == "none"
    assert answers["base:tutor"][1] != answers["base"][1]
