"""Federated rounds between real daemons on 127.0.0.1: join through the DHT, train, privatize, aggregate, apply."""

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.daemon_harness import Daemon
from tests.node.fed_daemons import (
    TOPICS,
    create_and_join,
    daemons,
    federations,
    fingerprint,
    rounds,
    tensors,
    wait_for,
    write_data,
)

pytestmark = pytest.mark.slow  # four daemons, three rounds

ROUND_DEADLINE_S = 150


@pytest.fixture
def four(tmp_path: Path, torch_base_folder: Path) -> Iterator[list[Daemon]]:
    with daemons(tmp_path, torch_base_folder, 4, {"MIRADOR_FEDERATION_KEEP_RELEASED": "true"}) as nodes:
        yield nodes


@pytest.mark.parametrize("mode", ["dp", "he", "he+dp"])
def test_four_daemons_complete_three_rounds(mode: str, four: list[Daemon], tmp_path: Path) -> None:
    # Arrange: A creates the federation; B and C join as members; D as a member (dp) or aggregator-only (he modes)
    a, d = four[0], four[3]
    rounds_wanted = 3
    data = [write_data(tmp_path / f"{t}.txt", t, i) for i, t in enumerate(TOPICS)]
    he = mode != "dp"
    trainers = four[:3] if he else four
    fid = create_and_join(
        four,
        data,
        mode,
        deadline_s=ROUND_DEADLINE_S,
        quorum=3,
        aggregator_only=d if he else None,
        noise=None if mode == "he" else 1.0,
        personal=mode != "he",  # example-level modes: the personal adapters' DP-SGD runs share the dataset's ledger
        lora="ffa",  # exact aggregation through real daemons (the default, ab, runs in the other daemon tests)
        updates="f32" if he else "q8",  # dp: 8-bit updates through real daemons (f32 runs in the other dp tests)
    )
    # Act
    wait_for(
        lambda: all(federations(n)[0]["global_round"] >= rounds_wanted for n in four),
        (rounds_wanted + 2) * ROUND_DEADLINE_S,
        f"{rounds_wanted} rounds",
    )
    # Assert: every node saw the same aggregates, each made of every trainer's update
    views = [federations(n)[0] for n in four]
    docs = [rounds(n, fid) for n in four]
    done = [{r["round"]: (r["aggregate_cid"], len(r["contributors"])) for r in doc} for doc in docs]
    for r in range(1, rounds_wanted + 1):
        assert {x[r] for x in done} == {done[0][r]} and done[0][r][1] == len(trainers), json.dumps(docs, indent=1)
    for v, node in zip(views, four, strict=True):
        assert len(v["members"]) == 4
        assert v["updates"] == ("ckks" if he else "q8")
        assert (v["epsilon_spent"] > 0) == (mode != "he" and node in trainers)  # only released updates cost ε
        status = httpx.get(f"{node.url}/v1/node/status", timeout=10).json()["federations"][0]
        assert status["global_round"] >= rounds_wanted
        if v["epsilon_spent"] > 0:  # the status shows the ledger's ε as of the last release
            assert status["epsilon_spent"] == pytest.approx(v["epsilon_spent"], rel=1e-3)
    if mode != "he":  # example-level DP-SGD: 2 local steps per round at q = batch 2 / 22 training examples, z = 1
        from opacus.accountants import PRVAccountant

        def independent(rounds_released: int) -> float:
            accountant = PRVAccountant()
            for _ in range(2 * rounds_released):
                accountant.step(noise_multiplier=1.0, sample_rate=2 / 22)
            return float(accountant.get_epsilon(delta=1e-5))

        for node in trainers:
            spent = federations(node)[0]["epsilon_spent"]
            released = sum(fingerprint(node) in r["contributors"] for r in rounds(node, fid))
            # the ledger records a round before its update leaves: one round may be in flight, not yet aggregated
            assert any(spent == pytest.approx(independent(k), rel=0.02) for k in (released, released + 1)), spent
            assert "training example" in federations(node)[0]["unit_of_privacy"]
            # the ledger keeps that spend, and the personal adapter's DP-SGD runs, on the account of the data file
            # they came from (its sha256): its ε is PRV over every run on that file, 2 steps each
            datasets = httpx.get(f"{node.url}/v1/federations", timeout=10).json()["datasets"]
            digest = hashlib.sha256(data[four.index(node)].read_bytes()).hexdigest()
            assert [(d["dataset"], sorted(d["spent_by"])) for d in datasets] == [
                (digest, sorted([fid, f"personal:{fid}"]))
            ], datasets
            with sqlite3.connect(f"file:{node.home / 'state.db'}?mode=ro", uri=True) as db:
                runs = db.execute("SELECT COUNT(*) FROM privacy_ledger WHERE dataset = ?", (digest,)).fetchone()[0]
            assert runs >= released + 2  # the personal runs after rounds 1 and 2 came before round 3 was applied
            assert datasets[0]["epsilon_spent"] == pytest.approx(independent(runs), rel=0.02)
            # the personal adapter serves beside the global one
            status = federations(node)[0]["status"]
            assert status["serve_as"] == "base:fed-club+fed-club-me" and status["personal"].startswith("fed-club-me")
        reply = httpx.post(
            f"{a.url}/v1/chat/completions",
            json={
                "model": "base:fed-club+fed-club-me",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] is not None
    if he:
        # The aggregator-only node aggregated every round and never held the secret key
        aggregator = views[3]
        assert not aggregator["he_secret_here"] and not list((d.home / "federations").rglob("he_secret.bin"))
        assert {r["aggregator"] for r in docs[0]} == {fingerprint(d)}
        assert all(v["he_secret_here"] for v in views[:3])
    # The applied global's lora_B moved by the mean of what the trainers released (decrypted CKKS sum / n under
    # HE; the dequantized 8-bit values in dp); FFA-LoRA: the updates carry lora_B alone and every lora_A stays at
    # its seeded init
    from node.fed.adapter import initial_adapter
    from node.inference.models import embedded_model_path

    start = initial_adapter(embedded_model_path(), 4, 8.0, ["q_proj", "v_proj"], seed=fid)
    installed = a.home / "adapters" / "fed-club"
    first = tensors(installed / "v1" / "adapter_model.safetensors")
    released = [tensors(n.home / "federations" / fid / "released" / "r1.safetensors") for n in trainers]
    assert all(set(rel) == {k for k in start if k.endswith("lora_B.weight")} for rel in released)
    for name, rel in released[0].items():
        mean = np.mean([rel[name] for rel in released], axis=0)
        scale = max(np.abs(mean).max(), 1e-12)
        assert np.abs((first[name] - start[name]) - mean).max() <= 1e-5 * scale, name
    for version in sorted(installed.glob("v*")):
        applied = tensors(version / "adapter_model.safetensors")
        assert all(np.array_equal(applied[k], start[k]) for k in start if k.endswith("lora_A.weight")), version
