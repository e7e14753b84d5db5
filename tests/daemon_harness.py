"""Start and stop real `mirador node start` processes on 127.0.0.1 for tests; every process is cleaned up."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    """A daemon process under test."""

    home: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Base URL of its API."""
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the daemon printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` and wait for the exit code (kills it if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def chat(self, content: str = "Hi", **extra: Any) -> httpx.Response:
        """A small non-streamed chat request."""
        body = {"model": "base", "messages": [{"role": "user", "content": content}], "max_tokens": 4} | extra
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=60)


def node_env(home: Path, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a daemon or CLI call on `home`, listening on `port`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRADOR_")}
    env |= {"MIRADOR_HOME": str(home), "MIRADOR_API_PORT": str(port), "MIRADOR_P2P_PORT": "0"}
    return env | (extra or {})


def spawn_daemon(
    home: Path, extra_env: dict[str, str] | None = None, args: tuple[str, ...] = (), port: int | None = None
) -> Daemon:
    """Start `mirador node start` as a real process (not waiting for it)."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home.parent / f"{home.name}-daemon-{port}.log"
    env = node_env(home, port, extra_env)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "node", "start", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Daemon(home=home, port=port, proc=proc, log_path=log_path, env=env)


def wait_ready(d: Daemon, timeout: float = START_TIMEOUT_S) -> Daemon:
    """Wait until /health answers; fail with the daemon's log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {d.proc.returncode}:\n{d.log()}")
        try:
            if httpx.get(f"{d.url}/health", timeout=1.0).status_code == 200:
                return d
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    d.stop(signal.SIGKILL)
    raise RuntimeError(f"daemon did not become ready in {timeout} s:\n{d.log()}")


def start_daemon(home: Path, extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Daemon:
    """Start a daemon and wait until it serves."""
    return wait_ready(spawn_daemon(home, extra_env, args))


def running(home: Path, extra_env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """Generator for fixtures: a ready daemon, stopped (SIGKILL if need be) afterwards."""
    d = start_daemon(home, extra_env)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.stop()


def stop_all(nodes: list[Daemon], timeout: float = 10.0) -> None:
    """Stop every daemon at once (SIGTERM to all, then wait; SIGKILL for one that does not stop in time)."""
    live = [d for d in nodes if d.proc.poll() is None]
    for d in live:
        d.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for d in live:
        try:
            d.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            d.stop(signal.SIGKILL)


def sse_events(lines: Iterator[str]) -> list[str]:
    """Parse an SSE body strictly: each event is one 'data: ' line followed by a blank line."""
    events: list[str] = []
    pending: str | None = None
    for line in lines:
        if pending is None:
            assert line.startswith("data: "), f"expected a 'data: ' line, got {line!r}"
            pending = line[len("data: ") :]
        else:
            assert line == "", f"expected a blank line after an event, got {line!r}"
            events.append(pending)
            pending = None
    assert pending is None, "the stream ended in the middle of an event"
    return events


def decode_events(events: list[str]) -> list[dict[str, Any]]:
    """JSON-decode all events before the final [DONE] (which must be last and present exactly once)."""
    assert events and events[-1] == "[DONE]", f"stream must end with [DONE], ended with {events[-1:]!r}"
    assert events.count("[DONE]") == 1
    return [json.loads(e) for e in events[:-1]]
