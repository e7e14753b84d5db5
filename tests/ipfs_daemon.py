"""A real IPFS daemon (js-ipfs 0.66.1 from scripts/ipfs, installed by scripts/ipfs/install.sh) for tests.

`running_ipfs(folder)` inits a repo in `folder` (`--profile test --emptyRepo`), puts the API, Gateway, Swarm and gRPC on
free 127.0.0.1 ports with no Bootstrap peers, MDNS and WebRTC-star off, starts `jsipfs daemon
--enable-preload=false` in its own process group, waits (bounded) until the RPC API answers, and always kills the
process group afterwards. `require_ipfs()` skips a test when the daemon is not installed, except under CI (env
CI set), where it fails: CI never skips these tests silently.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.daemon_harness import free_port

IPFS_DIR = Path(__file__).resolve().parent.parent / "scripts" / "ipfs"
JSIPFS = IPFS_DIR / "node_modules" / "ipfs" / "src" / "cli.js"
START_TIMEOUT_S = 60.0
INSTALL_HINT = "run `bash scripts/ipfs/install.sh` (npm ci of js-ipfs, ~3 min)"


@dataclass
class IpfsDaemon:
    """A running js-ipfs daemon."""

    repo: Path
    api_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    start_s: float

    @property
    def api_multiaddr(self) -> str:
        """The RPC API address as ipfshttpclient takes it."""
        return f"/ip4/127.0.0.1/tcp/{self.api_port}/http"

    @property
    def api_url(self) -> str:
        """Base URL of the RPC API."""
        return f"http://127.0.0.1:{self.api_port}/api/v0"

    def log(self) -> str:
        """Everything the daemon printed so far."""
        return self.log_path.read_text(errors="replace")


def missing_reason() -> str | None:
    """Why the daemon cannot run here (None when it can)."""
    if shutil.which("node") is None:
        return f"node is not installed; {INSTALL_HINT}"
    if not JSIPFS.is_file():
        return f"js-ipfs is not installed in {IPFS_DIR / 'node_modules'}; {INSTALL_HINT}"
    return None


def require_ipfs() -> None:
    """Skip the calling test (fail it under CI) when the daemon is not installed."""
    reason = missing_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"IPFS daemon needed under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _jsipfs(repo: Path, *args: str, timeout: float = 60.0) -> None:
    env = os.environ | {"IPFS_PATH": str(repo)}
    r = subprocess.run(["node", str(JSIPFS), *args], env=env, capture_output=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"jsipfs {' '.join(args)} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")


def _configure(repo: Path, api: int, gateway: int, swarm: int, rpc: int) -> None:
    path = repo / "config"
    config = json.loads(path.read_text())
    addresses = config.setdefault("Addresses", {})
    addresses["API"] = f"/ip4/127.0.0.1/tcp/{api}"
    addresses["Gateway"] = f"/ip4/127.0.0.1/tcp/{gateway}"
    addresses["Swarm"] = [f"/ip4/127.0.0.1/tcp/{swarm}"]
    addresses["RPC"] = f"/ip4/127.0.0.1/tcp/{rpc}/ws"  # js-ipfs's gRPC endpoint; its default 5003 would clash
    addresses["Delegates"] = []
    config["Bootstrap"] = []
    discovery = config.setdefault("Discovery", {})
    discovery.setdefault("MDNS", {})["Enabled"] = False
    discovery.setdefault("webRTCStar", {})["Enabled"] = False
    path.write_text(json.dumps(config, indent=2))


def stop(daemon: IpfsDaemon, timeout: float = 10.0) -> None:
    """Stop the daemon's whole process group (SIGTERM, then SIGKILL after `timeout`)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(daemon.proc.pid, signal.SIGTERM)
    try:
        daemon.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait()
    with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
        os.killpg(daemon.proc.pid, signal.SIGKILL)


def start(folder: Path) -> IpfsDaemon:
    """Init a repo in `folder` and start a daemon on it; raises RuntimeError (with its log) if it does not answer."""
    t0 = time.monotonic()
    repo = folder / "repo"
    _jsipfs(repo, "init", "--profile", "test", "--emptyRepo")
    api = free_port()
    _configure(repo, api, free_port(), free_port(), free_port())
    log_path = folder / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["node", str(JSIPFS), "daemon", "--enable-preload=false"],
            env=os.environ | {"IPFS_PATH": str(repo)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    daemon = IpfsDaemon(repo, api, proc, log_path, 0.0)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"js-ipfs daemon exited with {proc.returncode}:\n{daemon.log()}")
        try:
            r = httpx.post(f"{daemon.api_url}/version", timeout=2.0)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(daemon)
            raise RuntimeError(f"js-ipfs daemon did not answer within {START_TIMEOUT_S:.0f} s:\n{daemon.log()}")
        time.sleep(0.1)
    daemon.start_s = time.monotonic() - t0
    return daemon


def running_ipfs(folder: Path) -> Iterator[IpfsDaemon]:
    """A daemon for the duration of a fixture (or a `with contextlib.contextmanager(...)` block)."""
    daemon = start(folder)
    try:
        yield daemon
    finally:
        stop(daemon)
