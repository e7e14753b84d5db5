"""Daemon lifecycle as a user meets it: start, stop, kill, restart, refuse unsafe keys and bad config."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from node.inference.models import embedded_model_path
from tests.daemon_harness import (
    decode_events,
    free_port,
    node_env,
    run_cli,
    spawn_daemon,
    sse_events,
    start_daemon,
)

STREAM_BODY = {"model": "base", "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}


def mirador(home: Path, port: int, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return run_cli(home, port, *args, timeout=timeout)


def test_sigterm_cuts_a_running_stream_cleanly_and_exits_0(tmp_path: Path) -> None:
    # Arrange: a short grace period, so a 500-token stream cannot finish in time.
    d = start_daemon(tmp_path / "home", {"MIRADOR_API_SHUTDOWN_GRACE_S": "0.5"})
    with httpx.stream("POST", f"{d.url}/v1/completions", json=STREAM_BODY, timeout=60) as resp:
        lines = resp.iter_lines()
        first = [next(lines), next(lines)]
        # Act
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        events = decode_events(sse_events(iter([*first, *lines])))
    code = d.proc.wait(timeout=10)
    # Assert
    assert code == 0, d.log()
    assert time.monotonic() - t0 < 10
    assert events[-1]["error"]["code"] == "shutting_down"
    assert all("choices" in e for e in events[:-1])
    assert not (tmp_path / "home" / "run" / "daemon.pid").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_lets_a_short_stream_finish(tmp_path: Path, sig: int) -> None:
    d = start_daemon(tmp_path / "home", {"MIRADOR_API_SHUTDOWN_GRACE_S": "8"})
    body = STREAM_BODY | {"max_tokens": 40}
    with httpx.stream("POST", f"{d.url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        first = [next(lines), next(lines)]
        d.proc.send_signal(sig)
        events = decode_events(sse_events(iter([*first, *lines])))
    assert d.proc.wait(timeout=10) == 0
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "error" not in events[-1]


@pytest.mark.slow  # two daemon runs
def test_sigkill_then_restart_on_the_same_home(tmp_path: Path) -> None:
    # Arrange
    home = tmp_path / "home"
    first = start_daemon(home)
    identity = httpx.get(f"{first.url}/v1/node/status").json()["node"]["identity"]
    # Act
    first.stop(signal.SIGKILL)
    second = start_daemon(home)
    try:
        # Assert
        status = httpx.get(f"{second.url}/v1/node/status").json()
        assert status["node"]["identity"] == identity  # same key, nothing regenerated
        assert status["node"]["pid"] == second.pid  # the child `node start` supervises
        assert json.loads((home / "run" / "daemon.pid").read_text())["pid"] == second.pid
        assert second.chat().status_code == 200
    finally:
        assert second.stop() == 0


@pytest.mark.slow  # two daemons
def test_second_daemon_on_the_same_home_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    d = start_daemon(home)
    try:
        other = spawn_daemon(home)
        assert other.proc.wait(timeout=60) == 1
        assert "already running" in other.log()
        assert d.chat().status_code == 200
    finally:
        d.stop()


def test_world_readable_identity_key_is_refused(tmp_path: Path) -> None:
    # Arrange: a home whose key was made group/world readable
    home = tmp_path / "home"
    start_daemon(home).stop()
    key = home / "identity.key"
    os.chmod(key, 0o644)
    # Act
    d = spawn_daemon(home)
    code = d.proc.wait(timeout=60)
    # Assert
    assert code == 2
    assert "mode 0644" in d.log() and f"chmod 600 {key}" in d.log()
    assert key.stat().st_mode & 0o777 == 0o644  # the daemon did not silently "fix" it


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[api]\nport = "abc"\n', "api.port = 'abc'"),
        ("[api]\nport = 70000\n", "api.port = 70000"),
        ("[api]\nprot = 1\n", "unknown key 'api.prot'"),
        ('[node]\nprofile = "turbo"\n', "node.profile = 'turbo'"),
        ('[api]\nhost = "192.0.2.1"\n', "api.token must be set"),
        ("[api\n", "not valid TOML"),
    ],
)
def test_bad_node_toml_names_the_key_and_value(tmp_path: Path, toml: str, expected: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "node.toml").write_text(toml)
    d = spawn_daemon(home)
    assert d.proc.wait(timeout=60) == 2
    assert expected in d.log()
    assert str(home / "node.toml") in d.log()


def test_detach_status_stop_with_a_profile(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    started = mirador(home, port, "node", "start", "--detach", "--profile", "battery")
    try:
        assert started.returncode == 0, started.stderr
        status = mirador(home, port, "node", "status")
        assert status.returncode == 0, status.stderr
        assert "battery: 1 threads" in status.stdout
        as_json = json.loads(mirador(home, port, "node", "status", "--json").stdout)
        assert as_json["profile"]["slots"] == 1 and as_json["profile"]["n_ctx"] == 1024
        answer = mirador(home, port, "chat", "Say hello", "--max-tokens", "8")
        assert answer.returncode == 0 and answer.stdout.strip()
        session = subprocess.run(
            [sys.executable, "-m", "node.cli", "chat", "--max-tokens", "6"],
            env=node_env(home, port),
            input="Hello\nAnd again\n/exit\n",
            text=True,
            capture_output=True,
            timeout=90,
        )
        assert session.returncode == 0, session.stderr
        replies = [line for line in session.stdout.split("you> ") if line.startswith("node> ")]
        assert len(replies) == 2 and all(len(r.strip()) > len("node>") for r in replies)
    finally:
        stopped = mirador(home, port, "node", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert mirador(home, port, "node", "status").returncode == 3


def test_bearer_token_is_required_when_configured(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "home", {"MIRADOR_API_TOKEN": "s3cret"})
    try:
        assert httpx.get(f"{d.url}/health").status_code == 200
        denied = httpx.get(f"{d.url}/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(f"{d.url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = httpx.get(f"{d.url}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    finally:
        assert d.stop() == 0


@pytest.mark.slow  # two daemons
def test_port_in_use_is_reported(tmp_path: Path) -> None:
    first = start_daemon(tmp_path / "a")
    try:
        clash = spawn_daemon(tmp_path / "b", port=first.port)
        assert clash.proc.wait(timeout=60) == 1
        assert "cannot listen on" in clash.log() and "api.port" in clash.log()
    finally:
        first.stop()


def test_model_path_points_the_node_at_another_gguf(tmp_path: Path) -> None:
    # Arrange: another GGUF file (a copy of the embedded one under another name)
    other = tmp_path / "My-Model.Q4_1.gguf"
    shutil.copyfile(embedded_model_path(), other)
    # Act
    d = start_daemon(tmp_path / "home", {"MIRADOR_MODEL_PATH": str(other)})
    try:
        models = httpx.get(f"{d.url}/v1/models").json()["data"]
        status = httpx.get(f"{d.url}/v1/node/status").json()["model"]
        # Assert
        assert [m["id"] for m in models] == ["my-model.q4_1"]
        assert status["path"] == str(other)
        assert d.chat(model="my-model.q4_1").status_code == 200
    finally:
        assert d.stop() == 0


def test_a_file_that_is_not_gguf_is_refused_at_start(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 100)
    d = spawn_daemon(tmp_path / "home", {"MIRADOR_MODEL_PATH": str(bogus)})
    assert d.proc.wait(timeout=60) == 1
    assert "cannot load the model" in d.log()
