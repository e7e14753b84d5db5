"""A native crash leaves a traceback in the daemon's log, `node start` says why the node stopped, and the CLI
clients print one line when the daemon disconnects or is gone. The crash is real: the decode thread reads address 0
(MIRADOR_TEST_FAULT=decode_crash), the SIGSEGV a broken llama.cpp kernel causes."""

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from node.supervisor import crashed_in_llama, describe_death
from tests.daemon_harness import free_port, run_cli, spawn_daemon, wait_ready

CRASH = {"MIRADOR_TEST_FAULT": "decode_crash"}


def test_a_decode_thread_crash_is_logged_reported_and_the_clients_print_one_line(tmp_path: Path) -> None:
    # Arrange
    home = tmp_path / "home"
    d = wait_ready(spawn_daemon(home, CRASH))
    # Act: the first chat request crashes the daemon while `mirador chat` waits for its answer
    chat = run_cli(home, d.port, "chat", "hi")
    code = d.proc.wait(timeout=30)
    after = run_cli(home, d.port, "chat", "hi again")
    # Assert: `node start` exits non-zero with one line naming the signal, the log and the doctor
    assert code == 128 + signal.SIGSEGV, d.log()
    log_file = home / "run" / "daemon.log"
    assert (
        f"mirador: the node stopped: signal 11 (SIGSEGV, native crash in llama.cpp); see {log_file}; "
        "run `mirador doctor`" in d.log()
    )
    # Assert: faulthandler's traceback is in the daemon's log, in the decode thread, inside llama_backend's decode
    text = log_file.read_text()
    assert "Fatal Python error: Segmentation fault" in text
    current = text.partition("Current thread")[2].split("\n\n")[0]
    assert "llama_backend.py" in current and "in decode" in current and "engine.py" in current
    # Assert: the clients say it in one line, no traceback
    assert chat.returncode == 1 and "Traceback" not in chat.stderr, chat.stderr
    assert "closed the connection" in chat.stderr and str(log_file) in chat.stderr
    assert after.returncode == 3 and "no Mirador daemon is running" in after.stderr and "Traceback" not in after.stderr


def test_a_detached_daemon_logs_its_crash_and_why_it_stopped(tmp_path: Path) -> None:
    # Arrange
    home, port = tmp_path / "home", free_port()
    started = run_cli(home, port, "node", "start", "--detach", extra=CRASH)
    assert started.returncode == 0, started.stderr
    body = {"model": "base", "prompt": "Hi", "max_tokens": 2}
    log_file = home / "run" / "daemon.log"
    try:
        # Act: the first request crashes the daemon
        try:
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        except httpx.HTTPError:
            answer = None
        deadline = time.monotonic() + 30
        while "the node stopped" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        run_cli(home, port, "node", "stop", "--force")
    # Assert
    assert answer is None
    text = log_file.read_text()
    assert "Fatal Python error: Segmentation fault" in text
    assert "the node stopped: signal 11 (SIGSEGV, native crash in llama.cpp)" in text
    assert run_cli(home, port, "node", "status").returncode == 3


def test_the_reason_names_the_signal_and_where_the_crash_was(tmp_path: Path) -> None:
    # Arrange
    log = tmp_path / "daemon.log"
    log.write_text(
        "INFO started\nFatal Python error: Segmentation fault\n\nThread 0x1 (most recent call first):\n"
        '  File "/x/node/llama_backend.py", line 3 in decode\n\nCurrent thread 0x2 (most recent call first):\n'
        '  File "/x/numpy/core.py", line 9 in dot\n\nExtension modules: x\n'
    )
    # Act / Assert: llama.cpp ran in another thread, not in the crashing one
    assert not crashed_in_llama(log)
    assert "native crash in native code" in describe_death(signal.SIGSEGV, log)
    assert "killed from outside" in describe_death(signal.SIGKILL, log)
    assert crashed_in_llama(tmp_path / "missing.log") is False


def test_a_sigkilled_node_start_takes_its_daemon_along(tmp_path: Path) -> None:
    # Arrange
    d = wait_ready(spawn_daemon(tmp_path / "home"))
    daemon_pid = d.pid
    # Act
    d.stop(signal.SIGKILL)
    # Assert: the daemon is gone (PR_SET_PDEATHSIG), not left holding the home and the port
    deadline = time.monotonic() + 10
    while _alive(daemon_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(daemon_pid)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize(("sig", "received"), [(signal.SIGINT, "SIGINT"), (signal.SIGHUP, "SIGTERM")])
def test_node_start_passes_ctrl_c_or_a_closed_terminal_on_once(tmp_path: Path, sig: int, received: str) -> None:
    """A terminal's Ctrl-C reaches only `node start` (the daemon has its own process group): forwarded once, the
    daemon shuts down gracefully and exits 0; a hang-up (terminal closed) becomes a graceful SIGTERM."""
    d = wait_ready(spawn_daemon(tmp_path / "home"))
    assert os.getpgid(d.pid) != os.getpgid(d.proc.pid)
    d.proc.send_signal(sig)
    assert d.proc.wait(timeout=20) == 0
    assert "second signal" not in d.log() and f"received {received}: shutting down" in d.log()
