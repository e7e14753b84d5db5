"""`mirador federation serve|join --engine flower` refuse open settings before starting anything."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_harness import free_port, node_env

REFUSALS = {
    "no TLS and no --insecure": (["serve"], "--ssl-ca-certfile"),
    "plain HTTP off loopback": (["serve", "--insecure", "--host", "0.0.0.0"], "only on a loopback address"),
    "TLS files and --insecure": (["serve", "--insecure", "--ssl-ca-certfile", "ca.pem"], "not both"),
    "only part of the TLS files": (["serve", "--ssl-certfile", "s.pem", "--ssl-keyfile", "s.key"], "--ssl-ca-certfile"),
    "SuperNode auth over plain HTTP": (["serve", "--insecure", "--enable-supernode-auth"], "needs TLS"),
    "a SuperNode without data": (["join", "127.0.0.1:9092", "--engine", "flower", "--insecure"], "--data"),
    "a SuperNode with --insecure and a CA": (
        ["join", "127.0.0.1:9092", "--engine", "flower", "--data", "d.txt", "--insecure", "--root-certificates", "c"],
        "not both",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_open_flower_settings_are_refused_naming_the_flag(case: str, tmp_path: Path) -> None:
    # Arrange
    args, expected = REFUSALS[case]
    # Act
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "federation", *args, "--workdir", str(tmp_path)],
        env=node_env(tmp_path / "home", free_port()),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    # Assert: refused with one line naming what is wrong, and nothing was started
    assert done.returncode == 1, done.stdout + done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not list(tmp_path.rglob("*.log")), "a Flower process was started"  # serve logs in superlink/
