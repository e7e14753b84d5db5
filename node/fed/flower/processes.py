"""Flower processes: started in their own session with a log file, found again through /proc (every process a
SuperLink or SuperNode started, also those that left its process group), and stopped together."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class FlowerEngineError(RuntimeError):
    """A Flower process failed to start, a CLI call failed, or a run did not finish in time."""


class FlowerProcess:
    """One started Flower process (its own session/process group) with its log file; `stop()` ends it and every
    process it started (SuperExec, ServerApp/ClientApp processes), also those that left its process group."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        popen: "subprocess.Popen[bytes]",
        log_path: Path,
        address: str | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.popen = popen
        self.log_path = log_path
        self.address = address  # the API address it serves (SuperLink: Fleet/Control/Runtime; SuperNode: Runtime)
        self.seen: set[int] = {popen.pid}  # every pid observed in its process tree (for checks after stop)

    @property
    def pid(self) -> int:
        """Its process id (also its process-group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the main process still runs."""
        return self.popen.poll() is None

    def log_text(self, tail: int = 20_000) -> str:
        """The last `tail` characters of its log."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-tail:].decode("utf-8", "replace")

    def tree(self) -> set[int]:
        """Pids of its live (non-zombie) descendants and itself, remembered in `seen`; once it has exited (its pid
        may be reused), only the live ones among those seen before."""
        if self.popen.poll() is not None:
            return self.seen & live_pids()
        pids = {self.pid, *descendants(self.pid)} & live_pids()
        self.seen |= pids
        return pids

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to its process tree, SIGKILL to whatever is left after `timeout` s; return its exit code."""
        exited = self.popen.poll() is not None
        groups = self._groups()
        if exited:
            # Its pid may be reused by now. A group's id cannot be given to a new process while the group has
            # members, so a group whose leader is gone holds only its leftovers; a live process with its own pid
            # (reaped already) is somebody else's.
            stats = _all_stats()
            groups = {g for g in groups if g not in stats or (g != self.pid and g in self.seen)}
        _signal_groups(groups, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_groups(groups, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        deadline = time.monotonic() + timeout
        while _group_members(groups) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_members(groups):
            _signal_groups(groups, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _group_members(groups) and time.monotonic() < deadline:
                time.sleep(0.1)
        return self.popen.poll()

    def _groups(self) -> set[int]:
        """Its own process group and the groups led by its descendants (flwr starts SuperExec in a new session)."""
        groups = {self.pid}
        for pid in self.tree():
            pgid = _pgid(pid)
            if pgid is not None and pgid in self.seen:
                groups.add(pgid)
        return groups

    def __enter__(self) -> "FlowerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FlowerProcess({self.name!r}, pid={self.pid}, address={self.address!r})"


# ----------------------------------------------------------------------------------------------- process table


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[2])


def _all_stats() -> dict[int, tuple[str, int, int]]:
    stats: dict[int, tuple[str, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    return stats


def live_pids() -> set[int]:
    """Every process that exists and is not a zombie."""
    return {pid for pid, (state, _, _) in _all_stats().items() if state != "Z"}


def descendants(pid: int) -> set[int]:
    """Pids of every process below `pid` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for child, (_, ppid, _) in _all_stats().items():
        children.setdefault(ppid, []).append(child)
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _pgid(pid: int) -> int | None:
    st = _proc_stat(pid)
    return st[2] if st else None


def _group_members(groups: set[int]) -> set[int]:
    return {pid for pid, (state, _, pgid) in _all_stats().items() if pgid in groups and state != "Z"}


def _signal_groups(groups: set[int], sig: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


# -------------------------------------------------------------------------------------------- starting processes


def executable(name: str) -> str:
    """A Flower command from this interpreter's environment (bin folder next to sys.executable)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    raise FlowerEngineError(f"{name} not found next to {sys.executable}; is flwr==1.42.0 installed?")


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: its own FLWR_HOME, no telemetry or update check, this environment's
    bin folder first on PATH (SuperLinks/SuperNodes spawn `flower-superexec` by name) and this checkout on
    PYTHONPATH (every process runs the caller's Mirador code), offline Hugging Face libraries."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    root = str(Path(__file__).resolve().parents[3])  # the checkout (this file is node/fed/flower/processes.py)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH", "")] if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (the usual bind-to-0 race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def spawn(
    name: str, args: Sequence[str], workdir: Path, address: str | None, env: Mapping[str, str] | None = None
) -> FlowerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(args),
            cwd=workdir,
            env=dict(env) if env is not None else flower_env(workdir / "flwr-home"),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return FlowerProcess(name, args, popen, log_path, address)
