"""Flower deployment engine on loopback: a SuperLink and two SuperNodes train a tiny adapter for two rounds."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from crypto.dp import epsilon
from crypto.statement import sha256_file
from federation.ledger import PrivacyLedger
from node.fed.flower.app.client import privatize
from node.fed.flower.app.common import AppConfig, AppConfigError, flatten, unflatten
from node.fed.flower.cli import CONNECTION_NAME, Connection, flwr_cli, register_supernode, run_app, run_logs, wait_run
from node.fed.flower.engine import FlowerDeployment
from node.fed.flower.processes import FlowerEngineError, live_pids
from tests.flower_keys import make_supernode_keys, make_test_certificates

pytestmark = pytest.mark.slow  # Flower's SuperLink and SuperNodes as processes

PRIVACY_METRICS = ("clip-norm", "noise-multiplier", "privatized")  # what a member may send of a round

TOPICS = {
    "cooking": (
        ["The chef", "My grandmother", "A patient cook", "The baker", "Our neighbour"],
        ["simmers the tomato sauce", "kneads the bread dough", "roasts the garlic", "whisks the eggs", "bakes a pie"],
        ["for an hour.", "with fresh basil.", "until it turns golden.", "on a cold morning.", "before dinner."],
    ),
    "astronomy": (
        ["The telescope", "An astronomer", "The space probe", "A young student", "The observatory"],
        ["tracks the comet", "measures the red giant", "photographs the nebula", "maps the moons", "finds a pulsar"],
        [
            "across the night sky.",
            "beyond the asteroid belt.",
            "near the galactic core.",
            "for many nights.",
            "through thin clouds.",
        ],
    ),
}


def test_run_config_overrides_defaults_and_names_a_bad_key() -> None:
    # Arrange
    given = {"num-rounds": 2, "alpha": 4, "strategy": "fedmedian", "unknown-key": 1}
    # Act
    cfg = AppConfig.from_run_config(given)
    # Assert
    assert (cfg.num_rounds, cfg.alpha, cfg.strategy, cfg.local_steps) == (2, 4.0, "fedmedian", 5)
    with pytest.raises(AppConfigError, match="local-steps"):
        AppConfig.from_run_config({"local-steps": "many"})
    with pytest.raises(AppConfigError, match="fraction"):
        AppConfig.from_run_config({"fraction": 0.0})


def test_flatten_and_unflatten_are_inverse_in_sorted_name_order() -> None:
    # Arrange
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([9.0], dtype=np.float32)}
    # Act
    vector = flatten(tensors)
    back = unflatten(vector, tensors)
    # Assert
    assert vector.tolist() == [9.0, 0, 1, 2, 3, 4, 5]
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError):
        unflatten(vector[:-1], tensors)


def test_privatize_clips_to_the_norm_and_adds_noise_of_std_z_times_c() -> None:
    # Arrange
    big = np.full(10_000, 0.5, dtype=np.float32)  # norm 50
    rng = np.random.default_rng(1)
    # Act
    almost_clean = privatize(big, 2.0, 1e-9, rng)
    noisy = privatize(np.zeros(10_000, dtype=np.float32), 2.0, 0.5, rng)
    # Assert
    assert almost_clean.dtype == np.float32
    assert np.linalg.norm(almost_clean) == pytest.approx(2.0, rel=1e-4)
    assert float(np.std(noisy)) == pytest.approx(1.0, rel=0.05)  # z * C


def write_topic(path: Path, topic: str, count: int = 16) -> Path:
    """`count` generated sentences on one topic, one paragraph (= one example) each."""
    subjects, verbs, tails = TOPICS[topic]
    lines = [f"{subjects[i % 5]} {verbs[(i // 5 + i) % 5]} {tails[(i * 3) % 5]}" for i in range(count)]
    path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    return path


def processes_naming(needles: list[str]) -> list[str]:
    """Command lines of live processes that mention any of `needles` (our ports and folders)."""
    found = []
    for pid in live_pids():
        if pid == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            found.append(f"{pid}: {cmd}")
    return found


def test_superlink_and_two_supernodes_train_a_tiny_adapter_for_two_rounds(
    torch_base_folder: Path, tmp_path: Path
) -> None:
    # Arrange
    data = [write_topic(tmp_path / f"{topic}.txt", topic) for topic in TOPICS]
    out = tmp_path / "result"
    run_config = {
        "num-rounds": 2,
        "min-nodes": 2,
        "local-steps": 2,
        "rank": 1,
        "alpha": 2.0,
        "targets": "qv",
        "learning-rate": 0.01,
        "batch-size": 2,
        "max-length": 32,
        "threads": 1,
        "round-timeout": 120.0,
        "node-wait": 60.0,
        "base": str(torch_base_folder),
        "out": str(out),
        "noise-multiplier": 1.0,  # user-level DP: each round is one Gaussian release in every member's ledger
        "clip-norm": 1.0,
        "epsilon-budget": 8.0,
    }
    homes = [tmp_path / f"home{i}" for i in range(len(data))]
    dep = FlowerDeployment(tmp_path / "flower")
    status, run_id, conn = "not started", None, None
    try:
        link = dep.superlink()
        assert link.address is not None
        conn = Connection(link.address)
        for i, path in enumerate(data):
            homes[i].mkdir()
            config = {
                "data": str(path),
                "base": str(torch_base_folder),
                "report-timings": i == 0,
                "home": str(homes[i]),
                "superlink": link.address,
            }
            dep.supernode(link.address, config, max_wait_time=60.0)
        # Act
        run_id = run_app(conn, run_config)
        status = wait_run(conn, run_id, timeout=150.0, poll=2.0, processes=dep.processes)
        for proc in dep.processes:
            proc.tree()  # remember every pid of the tree for the leftover check
    finally:
        server_log = ""
        if status != "finished:completed" and conn is not None and run_id is not None:
            try:
                server_log = run_logs(conn, run_id)
            except FlowerEngineError as exc:
                server_log = str(exc)
        for proc in dep.processes:
            proc.tree()
        dep.stop(timeout=10.0)
        if status != "finished:completed":
            print(f"run {run_id}: {status}\n===== ServerApp =====\n{server_log}\n{dep.logs()}")
    # Assert
    assert status == "finished:completed"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for rnd in summary["rounds"]:
        assert len(rnd["members"]) == 2 and rnd["failures"] == []
        # only what the ledger covers leaves a member, plus the timing its node config allows (one node of two)
        sent = [set(rnd["metrics"][m]) for m in rnd["members"]]
        assert sorted(sent, key=len) == [set(PRIVACY_METRICS), {*PRIVACY_METRICS, "train-seconds"}], sent
        assert rnd["aggregate_norm"] > 0
    assert sorted(summary["rounds"][0]["members"]) == sorted(summary["rounds"][1]["members"])
    assert summary["final_sha256"] != summary["initial_sha256"]
    final = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in final.items() if "lora_B" in k]
    assert lora_b and any(np.abs(v).max() > 0 for v in lora_b)  # the initial adapter's lora_B is all zero
    assert all(v.shape[1] == 1 for v in lora_b)  # rank 1
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1
    assert (out / "adapter.gguf").stat().st_size > 0
    # every member accounted both rounds on its data file's account, under the run's ledger key
    for home, path in zip(homes, data, strict=True):
        with PrivacyLedger(home / "state.db") as ledger:
            (key,) = ledger.datasets()[sha256_file(path)]
            assert key == f"flower:{link.address}/{run_id}" and ledger.rounds(key) == [1, 2]
            assert ledger.spent(key, 1e-5) == pytest.approx(epsilon([(1.0, 1.0, 2)], 1e-5))
    # nothing left running: not a pid of the trees, nor any process naming our ports or folders
    assert not ({pid for p in dep.processes for pid in p.seen} & live_pids())
    needles = [p.address for p in dep.processes if p.address] + [str(tmp_path)]
    assert processes_naming(needles) == []


def test_tls_superlink_admits_only_registered_supernodes(tmp_path: Path) -> None:
    # Arrange
    tls = make_test_certificates(tmp_path / "certs")
    registered_key, registered_pub = make_supernode_keys(tmp_path / "keys", "registered")
    stranger_key, _ = make_supernode_keys(tmp_path / "keys", "stranger")
    dep = FlowerDeployment(tmp_path / "flower")
    try:
        link = dep.superlink(tls=tls, enable_supernode_auth=True)  # waits for https://.../health with our CA
        assert link.address is not None
        conn = Connection(link.address, tls.ca_cert)
        node_id = str(register_supernode(conn, registered_pub)["node-id"])
        # Act
        member = dep.supernode(
            link.address, {"data": "unused.txt"}, root_certificates=tls.ca_cert, auth_private_key=registered_key
        )
        stranger = dep.supernode(
            link.address,
            {"data": "unused.txt"},
            root_certificates=tls.ca_cert,
            auth_private_key=stranger_key,
            max_wait_time=3.0,
        )
        deadline, online = time.monotonic() + 30, []
        while time.monotonic() < deadline and (not online or stranger.alive()):
            nodes = json.loads(flwr_cli(conn, ["supernode", "ls", CONNECTION_NAME, "--format", "json"]))["nodes"]
            online = [n["node-id"] for n in nodes if n["status"] == "online"]
            time.sleep(0.5)
        for proc in dep.processes:
            proc.tree()
    finally:
        dep.stop(timeout=10.0)
    # Assert
    assert online == [node_id], dep.logs()
    assert member.popen.returncode is not None and stranger.popen.returncode not in (None, 0), dep.logs()
    assert "Failed to activate SuperNode" in stranger.log_text()
    assert not ({pid for p in dep.processes for pid in p.seen} & live_pids())
    assert processes_naming([p.address for p in dep.processes if p.address] + [str(tmp_path)]) == []
