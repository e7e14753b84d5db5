"""One daemon per home: an flock the kernel releases even on SIGKILL, plus an informational pid file."""

import fcntl
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from node.core.fsutil import atomic_write_text
from node.core.home import NodeHome


class AlreadyRunningError(Exception):
    """Another daemon holds this home's lock."""


@dataclass(frozen=True)
class DaemonInfo:
    """What the running daemon wrote in its pid file."""

    pid: int
    host: str
    port: int
    started_at: float

    @property
    def url(self) -> str:
        """Base URL of its HTTP API."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class RunLock:
    """Exclusive lock on `home/run/daemon.lock`, held for the daemon's lifetime."""

    def __init__(self, home: NodeHome) -> None:
        self.home = home
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunningError naming the holder."""
        fd = os.open(self.home.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = read_pid_file(self.home)
            holder = f" (pid {info.pid})" if info else ""
            raise AlreadyRunningError(f"a Mirador daemon{holder} is already running on {self.home.root}") from None
        self._fd = fd

    def write_pid_file(self, host: str, port: int) -> None:
        """Record pid and API address for `mirador node stop|status`."""
        data = {"pid": os.getpid(), "host": host, "port": port, "started_at": time.time()}
        atomic_write_text(self.home.pid_file, json.dumps(data) + "\n")

    def release(self) -> None:
        """Remove the pid file and drop the lock."""
        if self._fd is None:
            return
        try:
            self.home.pid_file.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def is_locked(home: NodeHome) -> bool:
    """True while some daemon holds this home's lock."""
    if not home.lock_file.exists():
        return False
    fd = os.open(home.lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def read_pid_file(home: NodeHome) -> DaemonInfo | None:
    """The pid file's content, or None if it is missing or unreadable."""
    try:
        data: Any = json.loads(home.pid_file.read_text())
        return DaemonInfo(int(data["pid"]), str(data["host"]), int(data["port"]), float(data["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_daemon(home: NodeHome) -> DaemonInfo | None:
    """The daemon running on `home`, or None (a stale pid file left by a killed daemon counts as none)."""
    if not is_locked(home):
        return None
    return read_pid_file(home)
