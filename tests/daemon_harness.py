"""Start and stop real `mirador node start` processes on 127.0.0.1 for tests; every process is cleaned up."""

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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

    @property
    def pid(self) -> int:
        """The daemon's own pid: `mirador node start` (proc) runs it as its one child (node.supervisor)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, f"`node start` has children {children}"
        return int(children[0])

    def log(self) -> str:
        """Everything the daemon printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` to `node start` and wait for its exit code (kills it if it does not exit in time), then until
        the home's lock is free (a SIGKILLed `node start` takes its daemon along, a moment later)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        wait_unlocked(self.home, timeout)
        return code

    @property
    def auth(self) -> dict[str, str]:
        """The Authorization header of state-changing routes: the home's API token (node.core.api_token)."""
        return {"Authorization": f"Bearer {(self.home / 'api.token').read_text().strip()}"}

    def wait_provided(self, timeout: float = 30.0) -> None:
        """Return once the node has announced every artifact it pulled as provided here (a pull answers first)."""
        deadline = time.monotonic() + timeout
        while True:
            market = httpx.get(f"{self.url}/v1/node/status", headers=self.auth, timeout=10).json()["p2p"]["market"]
            if not market["providing"]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url}: still announcing {market['providing']} pulled artifacts")
            time.sleep(0.05)

    def chat(self, content: str = "Hi", **extra: Any) -> httpx.Response:
        """A small non-streamed chat request."""
        body = {"model": "base", "messages": [{"role": "user", "content": content}], "max_tokens": 4} | extra
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=60)


@functools.cache
def probe_cache() -> Path:
    """The extra-buffers probe's verdict for the embedded model, decided once per test process (the real probe, in
    child processes) and copied into every new test home: a verdict is keyed by model digest, llama.cpp build and
    CPU flags, so it holds for every daemon here, and each daemon need not probe again."""
    from node.inference.extra_buffers import choose
    from node.inference.models import embedded_model_path

    folder = Path(tempfile.mkdtemp(prefix="mirador-test-probe-"))
    atexit.register(shutil.rmtree, folder, True)
    cache = folder / "extra_buffers.json"
    choose(embedded_model_path(), "auto", cache)
    return cache


def extra_buffers_for_tests() -> bool:
    """The extra-buffers choice in-process tests load the embedded model with (the same verdict daemons get)."""
    from node.inference.extra_buffers import choose
    from node.inference.models import embedded_model_path

    return choose(embedded_model_path(), "auto", probe_cache()).use


def wait_unlocked(home: Path, timeout: float = 10.0) -> None:
    """Wait until no daemon holds `home`'s lock."""
    from node.core.home import NodeHome
    from node.core.runlock import is_locked

    deadline = time.monotonic() + timeout
    while is_locked(NodeHome(home)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"a daemon still holds {home} {timeout} s after `node start` exited")
        time.sleep(0.02)


def node_env(home: Path, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a daemon or CLI call on `home`, listening on `port`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRADOR_")}
    env |= {"MIRADOR_HOME": str(home), "MIRADOR_API_PORT": str(port), "MIRADOR_P2P_PORT": "0"}
    # a remembered chat is recalled by the next similar one: tests of everything but memory need prompts as sent
    # (exact token counts, greedy outputs compared across requests); memory tests turn it on
    env["MIRADOR_MEMORY_REMEMBER_CHATS"] = "false"
    return env | (extra or {})


def run_cli(
    home: Path, port: int, *args: str, extra: dict[str, str] | None = None, timeout: float = 120
) -> "subprocess.CompletedProcess[str]":
    """Run `mirador ARGS` on `home` (API port `port`) as a user would, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        env=node_env(home, port, extra),
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def spawn_daemon(
    home: Path,
    extra_env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    port: int | None = None,
    seed_probe: bool = True,
) -> Daemon:
    """Start `mirador node start` as a real process (not waiting for it); `seed_probe` gives a new home this test
    process's extra-buffers verdict (tests of the probe itself pass False)."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    cached = home / "cache" / "extra_buffers.json"
    if seed_probe and not cached.exists():
        cached.parent.mkdir(mode=0o700, exist_ok=True)
        shutil.copyfile(probe_cache(), cached)
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
    for d in live:
        wait_unlocked(d.home, timeout)


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
