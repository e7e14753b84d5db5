"""The marketplace between real daemons over libp2p: DHT records, search, pull from peers, resume after a provider dies.

No IPFS daemon here: every node uses its embedded block store, and blocks travel over the nodes' own protocol.
"""

import hashlib
import json
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.adapters.check import base_dims_of_file
from node.inference.models import embedded_model_path
from tests.daemon_harness import Daemon, node_env, start_daemon, stop_all
from tests.lora_files import write_adapter

pytestmark = pytest.mark.slow  # up to five daemons and a 50 MB transfer

DISCOVERY_TIMEOUT_S = 60


def peers(d: Daemon) -> dict:
    return httpx.get(f"{d.url}/v1/node/peers", timeout=10).json()


def cli(d: Daemon, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`mirador ARGS` against the home of `d` (so model pull/search go through the running daemon)."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        env=node_env(d.home, d.port),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def chain_of_daemons(tmp_path: Path, n: int, prefix: str, env: dict[int, dict[str, str]] | None = None) -> list[Daemon]:
    """`n` daemons, each started with only the previous one's address as its bootstrap peer (`env`: more variables
    for the i-th)."""
    nodes: list[Daemon] = []
    try:
        for i in range(n):
            extra = {"MIRADOR_P2P_BOOTSTRAP": peers(nodes[-1])["listen_addrs"][0]} if nodes else {}
            nodes.append(start_daemon(tmp_path / f"{prefix}{i}", extra | (env or {}).get(i, {})))
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def wait_until_all_known(nodes: list[Daemon]) -> list[set[str]]:
    """Poll (bounded) until every routing table holds every other node; returns the last view."""
    ids = [peers(d)["peer_id"] for d in nodes]
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while True:
        known = [set(peers(d)["known_peers"]) for d in nodes]
        if all(k >= set(ids) - {ids[i]} for i, k in enumerate(known)) or time.monotonic() > deadline:
            return known
        time.sleep(0.5)


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Daemon]]:
    nodes = chain_of_daemons(tmp_path_factory.mktemp("five"), 5, "n")
    try:
        yield nodes
    finally:
        stop_all(nodes)


def test_five_daemons_with_one_bootstrap_address_each_discover_each_other(five: list[Daemon]) -> None:
    # Act
    known = wait_until_all_known(five)
    # Assert
    ids = [peers(d)["peer_id"] for d in five]
    for i, k in enumerate(known):
        assert k >= set(ids) - {ids[i]}, f"node {i} knows {len(k)} of 4 peers"


def test_an_adapter_published_on_a_is_found_pulled_verified_and_served_by_e(five: list[Daemon], tmp_path: Path) -> None:
    # Arrange: A publishes a strong adapter; E trusts A's key but was never connected to A at start
    a, e = five[0], five[-1]
    wait_until_all_known(five)
    folder = tmp_path / "tutor"
    folder.mkdir()
    write_adapter(folder / "adapter.gguf", base_dims_of_file(embedded_model_path()), r=8, seed=1, std=0.1)
    published = cli(a, "model", "publish", str(folder), "--name", "tutor", "--version", "1.0.0", "--kind", "adapter")
    assert published.returncode == 0, published.stderr
    assert "announced tutor (1.0.0) on the network" in published.stdout
    cli(a, "keys", "export", "--public", str(tmp_path / "a.pem"))
    assert cli(e, "trust", "add", str(tmp_path / "a.pem")).returncode == 0
    # Act
    search = cli(e, "model", "search", "tutor", "--json")
    pulled = cli(e, "model", "pull", "tutor")
    body = {"model": "base:tutor", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    served = httpx.post(f"{e.url}/v1/chat/completions", json=body | {"temperature": 0}, timeout=60)
    base = httpx.post(f"{e.url}/v1/chat/completions", json=body | {"model": "base", "temperature": 0}, timeout=60)
    verify = cli(e, "model", "verify", "tutor")
    gossip = recent_artifacts(e, "tutor")
    # Assert
    assert search.returncode == 0, search.stderr
    rows = json.loads(search.stdout)
    assert [(r["name"], r["version"], r["trusted"]) for r in rows] == [("tutor", "1.0.0", True)]
    assert pulled.returncode == 0, pulled.stderr + pulled.stdout
    assert "installed as adapter tutor@v1" in pulled.stdout
    assert served.headers["x-mirador-adapters"] == "tutor@v1"
    assert served.json()["choices"][0]["message"]["content"] != base.json()["choices"][0]["message"]["content"]
    assert verify.returncode == 0, verify.stderr
    assert [(g["version"], g["kind"], g["publisher"]) for g in gossip] == [("1.0.0", "adapter", rows[0]["publisher"])]


def recent_artifacts(d: Daemon, name: str, timeout: float = 15) -> list[dict]:
    """The artifact.published notices about `name` that reached `d` by gossip (polled, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{d.url}/v1/node/status", timeout=10).json()["p2p"]["notices"]
        found = [n for n in status["recent_artifacts"] if n["name"] == name]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_search_and_pull_of_an_unknown_name_say_so(five: list[Daemon]) -> None:
    # Act
    search = cli(five[2], "model", "search", "nobody-published-this")
    pulled = cli(five[2], "model", "pull", "nobody-published-this")
    # Assert
    assert search.returncode == 1 and "no publisher announces" in search.stdout
    assert pulled.returncode == 1 and "no published artifact named" in pulled.stderr


def write_safetensors(path: Path, size: int, seed: int) -> None:
    """A valid safetensors file with one u8 tensor of `size` random bytes (a stand-in for model weights)."""
    header = json.dumps({"weights": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for _ in range(size // 2**20):
            f.write(rng.randbytes(2**20))
        f.write(rng.randbytes(size % 2**20))


def test_provider_killed_mid_transfer_of_a_50mb_model_the_pull_resumes_from_another(tmp_path: Path) -> None:
    # Arrange: A publishes a 50 MB model, B pulls it (so B provides it too), then C pulls from both. C fetches over
    # the libp2p block protocol (as a node from before the bulk channel would): over the bulk channel 50 MB arrive
    # within one progress interval, before A could be killed mid-transfer (test_bulk_channel kills a bulk provider)
    a, b, c = nodes = chain_of_daemons(tmp_path, 3, "m", {2: {"MIRADOR_P2P_BULK": "false"}})
    try:
        wait_until_all_known(nodes)
        want = publish_big(a, tmp_path, seed=7)
        assert cli(b, "model", "pull", "big", "--trust-publisher").returncode == 0
        b.wait_provided()  # B tells its user first, then announces itself as a provider
        # Act: C pulls through its API; A is killed once C has part of the file
        events: list[dict] = []
        killed_at = -1
        body = {"target": "big@1.0.0", "trust_publisher": True}
        with httpx.stream("POST", f"{c.url}/v1/market/pull", json=body, headers=c.auth, timeout=300) as resp:
            for line in resp.iter_lines():
                event = json.loads(line)
                events.append(event)
                if event["event"] == "progress" and killed_at < 0 and 0 < event["done"] < event["total"]:
                    a.proc.send_signal(signal.SIGKILL)
                    a.proc.wait(10)
                    killed_at = event["done"]
        done = events[-1]
        got = hashlib.sha256((Path(done["folder"]) / "model.safetensors").read_bytes()).hexdigest()
        # Assert: A died mid-transfer, C still has a verified, complete copy; both providers had served blocks
        assert done["event"] == "done", done
        assert 0 < killed_at < 50 * 2**20
        assert got == want
        assert set(done["providers"]) == {peers(b)["peer_id"], a_peer(a)}, done["providers"]
        assert a_peer(a) in done["provider_failures"], done
        assert cli(c, "model", "verify", "big", "--trust-publisher").returncode == 0
        print(done["providers"], done["provider_failures"], killed_at)
    finally:
        stop_all(nodes)


def test_a_puller_killed_mid_pull_leaves_nothing_installed_and_its_next_pull_resumes(tmp_path: Path) -> None:
    # Arrange: A publishes a 50 MB model (200 blocks of 256 KiB) and serves at most 20 MB/s (a home uplink; uncapped,
    # the bulk channel moves 50 MB within one progress interval); B starts pulling it over the bulk channel
    a, b = nodes = chain_of_daemons(tmp_path, 2, "k", {0: {"MIRADOR_P2P_UPLOAD_LIMIT_MBS": "20"}})
    try:
        wait_until_all_known(nodes)
        want = publish_big(a, tmp_path, seed=11)
        killed_at = -1
        body = {"target": "big@1.0.0", "trust_publisher": True}
        with httpx.stream("POST", f"{b.url}/v1/market/pull", json=body, headers=b.auth, timeout=300) as resp:
            for line in resp.iter_lines():
                event = json.loads(line)
                file_progress = event["event"] == "progress" and event["file"] == "model.safetensors"
                if file_progress and 8 * 2**20 < event["done"] < event["total"]:  # Act: SIGKILL B mid-transfer
                    b.proc.send_signal(signal.SIGKILL)
                    b.proc.wait(10)
                    killed_at = event["done"]
                    break
        assert killed_at > 0, "the pull ended before B could be killed"
        # Assert: nothing of the artifact is installed; a restarted B pulls again and fetches only what it lacked
        nodes[1] = b = start_daemon(b.home, {"MIRADOR_P2P_BOOTSTRAP": peers(a)["listen_addrs"][0]})
        listed = cli(b, "model", "list", "--json")
        assert listed.returncode == 0 and "big" not in listed.stdout, listed.stdout
        events = []
        with httpx.stream("POST", f"{b.url}/v1/market/pull", json=body, headers=b.auth, timeout=300) as resp:
            events = [json.loads(line) for line in resp.iter_lines() if line]
        done = events[-1]
        assert done["event"] == "done", done
        assert hashlib.sha256((Path(done["folder"]) / "model.safetensors").read_bytes()).hexdigest() == want
        fetched = sum(done["providers"].values())
        assert 0 < fetched < 200, done["providers"]  # the blocks B had verified before it died were kept
        assert cli(b, "model", "verify", "big", "--trust-publisher").returncode == 0
        served = httpx.get(f"{a.url}/v1/node/status", headers=a.auth, timeout=10).json()["p2p"]["market"]
        assert served["bulk_blocks_served"] >= 200, served  # both pulls went over the bulk channel
    finally:
        stop_all(nodes)


def publish_big(a: Daemon, tmp_path: Path, seed: int) -> str:
    """A publishes big@1.0.0, a 50 MB safetensors model of random bytes; its sha256."""
    folder = tmp_path / "big"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", 50 * 2**20, seed=seed)
    published = cli(a, "model", "publish", str(folder), "--name", "big", "--version", "1.0.0", "--no-bench")
    assert published.returncode == 0, published.stderr
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def a_peer(d: Daemon) -> str:
    """The peer id of a (possibly dead) daemon, from its log."""
    for line in d.log().splitlines():
        if "libp2p peer " in line:
            return line.split("libp2p peer ")[1].split()[0]
    raise AssertionError("no peer id in the log")


def test_market_api_errors_name_what_was_wrong(five: list[Daemon]) -> None:
    # Arrange
    url = five[1].url
    # Act
    bad_name = httpx.get(f"{url}/v1/market/search", params={"name": "Not A Name!"}, timeout=30)
    auth = five[1].auth
    unknown = httpx.post(f"{url}/v1/market/announce", json={"name": "never-published"}, headers=auth, timeout=30)
    extra_field = httpx.post(f"{url}/v1/market/pull", json={"target": "x", "mirror": True}, headers=auth, timeout=30)
    # Assert
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name"
    assert unknown.status_code == 404 and "published nothing named" in unknown.json()["error"]["message"]
    assert extra_field.status_code == 400 and "mirror" in extra_field.json()["error"]["message"]


def test_without_p2p_the_market_api_says_so_and_pull_stays_local(tmp_path: Path) -> None:
    # Arrange
    d = start_daemon(tmp_path / "solo", {"MIRADOR_P2P_ENABLED": "false"})
    try:
        # Act
        search = httpx.get(f"{d.url}/v1/market/search", params={"name": "tutor"}, timeout=30)
        pulled = cli(d, "model", "pull", "tutor")
        # Assert
        assert search.status_code == 409 and search.json()["error"]["code"] == "market_unavailable"
        assert pulled.returncode == 1 and "no published artifact named 'tutor' is known" in pulled.stderr
    finally:
        d.stop()
