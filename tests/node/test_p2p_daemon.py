"""The libp2p host inside real daemons: peer ids, connect by multiaddr, bootstrap at start, port conflicts."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.daemon_harness import Daemon, free_port, node_env, spawn_daemon, start_daemon

pytestmark = pytest.mark.slow  # several daemons


def peers(d: Daemon) -> dict:
    return httpx.get(f"{d.url}/v1/node/peers", timeout=10).json()


def test_two_daemons_connect_and_a_third_bootstraps(tmp_path: Path) -> None:
    # Arrange
    a = start_daemon(tmp_path / "a")
    b = start_daemon(tmp_path / "b")
    c = None
    try:
        a_addr = peers(a)["listen_addrs"][0]
        # Act: b connects to a through the CLI; c is started with a as its bootstrap peer
        cli = subprocess.run(
            [sys.executable, "-m", "node.cli", "node", "connect", a_addr],
            env=node_env(b.home, b.port),
            capture_output=True,
            text=True,
            timeout=60,
        )
        c = start_daemon(tmp_path / "c", {"MIRADOR_P2P_BOOTSTRAP": a_addr})
        bad = httpx.post(f"{b.url}/v1/node/connect", json={"addr": "/ip4/127.0.0.1/tcp/1"}, headers=b.auth, timeout=30)
        status = httpx.get(f"{a.url}/v1/node/status", timeout=10).json()["p2p"]
        # Assert
        assert cli.returncode == 0, cli.stderr
        assert peers(a)["peer_id"] in peers(b)["peers"]
        assert peers(b)["peer_id"] in status["peers"] and peers(c)["peer_id"] in peers(a)["peers"]
        assert a_addr.startswith("/ip4/127.0.0.1/tcp/") and a_addr.endswith(f"/p2p/{status['peer_id']}")
        assert bad.status_code == 400 and "/p2p/" in bad.json()["error"]["message"]
    finally:
        for d in (a, b, c):
            if d is not None:
                d.stop()


def test_the_peer_id_is_the_node_key_and_survives_restarts(tmp_path: Path) -> None:
    first = start_daemon(tmp_path / "home")
    peer_id = peers(first)["peer_id"]
    assert first.stop() == 0
    second = start_daemon(tmp_path / "home")
    try:
        assert peers(second)["peer_id"] == peer_id
    finally:
        second.stop()


def test_a_taken_p2p_port_is_reported(tmp_path: Path) -> None:
    port = free_port()
    first = start_daemon(tmp_path / "a", {"MIRADOR_P2P_PORT": str(port)})
    try:
        second = spawn_daemon(tmp_path / "b", {"MIRADOR_P2P_PORT": str(port)})
        code = second.proc.wait(timeout=60)
        assert code == 1 and "p2p.port" in second.log(), second.log()
    finally:
        first.stop()


def test_a_restarted_node_redials_the_peers_it_knew_without_bootstrap(tmp_path: Path) -> None:
    # Arrange: b knows a through its bootstrap setting, then stops (saving its routing table)
    import time

    a = start_daemon(tmp_path / "a")
    b = start_daemon(tmp_path / "b", {"MIRADOR_P2P_BOOTSTRAP": peers(a)["listen_addrs"][0]})
    restarted = None
    try:
        a_id = peers(a)["peer_id"]
        deadline = time.monotonic() + 30
        while a_id not in peers(b)["known_peers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b.stop() == 0
        saved = json.loads((tmp_path / "b" / "run" / "peers.json").read_text())
        # Act: b starts again with no bootstrap peer at all
        restarted = start_daemon(tmp_path / "b")
        deadline = time.monotonic() + 30
        while a_id not in peers(restarted)["peers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        # Assert
        assert [p["peer_id"] for p in saved["peers"]] == [a_id]
        assert a_id in peers(restarted)["peers"]
    finally:
        for d in (a, b, restarted):
            if d is not None and d.proc.poll() is None:
                d.stop()
