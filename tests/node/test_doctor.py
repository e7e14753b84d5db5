"""`mirador doctor` as a user runs it: every check on a healthy home, each problem named with its fix."""

import json
import socket
import subprocess
from pathlib import Path

from tests.daemon_harness import Daemon, free_port, run_cli, start_daemon

CHECK_NAMES = {"python", "packages", "cpu", "llama.cpp", "extra buffers", "decode", "torch", "training", "config",
               "home", "daemon", "api port", "p2p port", "disk", "store"}  # fmt: skip


def doctor(
    home: Path, port: int, *args: str, extra: dict[str, str] | None = None
) -> "subprocess.CompletedProcess[str]":
    return run_cli(home, port, "doctor", *args, extra=extra, timeout=300)


def test_doctor_on_a_healthy_home_with_its_daemon_running_passes_every_check(tmp_path: Path) -> None:
    # Arrange: a home whose daemon serves on its API port
    d: Daemon = start_daemon(tmp_path / "home")
    try:
        # Act
        text = doctor(d.home, d.port)
        as_json = doctor(d.home, d.port, "--json")
    finally:
        d.stop()
    # Assert
    assert text.returncode == 0, text.stdout + text.stderr
    printed = {line[6:].split("  ")[0].strip() for line in text.stdout.splitlines() if line[:5].strip()}
    assert printed >= CHECK_NAMES, printed
    assert f"127.0.0.1:{d.port} in use by this node" in text.stdout
    assert "tok/s" in text.stdout and "extra buffer types" in text.stdout
    doc = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and doc["ok"] is True
    assert {c["name"] for c in doc["checks"]} == CHECK_NAMES
    assert all(c["status"] in {"ok", "warn"} for c in doc["checks"])


def test_doctor_names_a_readable_key_a_taken_port_and_a_missing_ipfs_daemon_with_their_fixes(tmp_path: Path) -> None:
    # Arrange: a home with a 0644 key, the API port held by another process, an IPFS backend nobody serves
    home = tmp_path / "home"
    start_daemon(home).stop()
    (home / "identity.key").chmod(0o644)
    ipfs_api = f"/ip4/127.0.0.1/tcp/{free_port()}/http"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = {"MIRADOR_STORE_BACKEND": "ipfs", "MIRADOR_STORE_IPFS_API": ipfs_api}
        # Act
        text = doctor(home, port, extra=extra)
        as_json = doctor(home, port, "--json", extra=extra)
    # Assert: exit 1, each problem with its fix
    assert text.returncode == 1, text.stdout + text.stderr
    out = text.stdout
    assert f"{home / 'identity.key'} is 0644" in out and f"chmod 600 {home / 'identity.key'}" in out
    assert f"127.0.0.1:{port} is taken by another process" in out and "MIRADOR_API_PORT" in out
    assert f"no IPFS daemon answers at {ipfs_api}" in out and "ipfs daemon" in out and 'backend = "embedded"' in out
    doc = json.loads(as_json.stdout)
    failed = {c["name"] for c in doc["checks"] if c["status"] == "fail"}
    assert as_json.returncode == 1 and doc["ok"] is False
    assert failed == {"home", "api port", "store"}, doc
    assert all(c["fix"] for c in doc["checks"] if c["status"] == "fail")
