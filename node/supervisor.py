"""`mirador node start` runs the daemon as a child process and says why it stopped when it dies by a signal.

A native crash (a SIGSEGV inside llama.cpp) kills a process before any Python code can report it: faulthandler
writes the traceback into the daemon's log, and this parent, which outlives the crash, tells the user in one line
what happened and where to look. The daemon gets its own process group, so the terminal's Ctrl-C reaches only
this parent, which forwards it once (a second Ctrl-C is forwarded again: the daemon's "stop now"). The daemon dies
with its parent (PR_SET_PDEATHSIG on Linux), so a SIGKILLed `mirador node start` leaves no daemon behind.
"""

import ctypes
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

NO_SUPERVISOR_FLAG = "--no-supervisor"
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
# A faulthandler dump names the crashing thread "Current thread"; these frames mean llama.cpp was running.
_LLAMA_FRAME = re.compile(r'File ".*(?:llama_cpp|llama_backend\.py|node/inference/)')


def run_supervised(daemon_argv: list[str], log_file: Path) -> int:
    """Run `python -m node.cli <daemon_argv> --no-supervisor` as the daemon; returns the exit code for the CLI."""
    cmd = [sys.executable, "-m", "node.cli", *daemon_argv, NO_SUPERVISOR_FLAG]
    parent = os.getpid()
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, process_group=0, preexec_fn=_die_with(parent))
    previous = {sig: signal.signal(sig, _forward_to(child)) for sig in _FORWARDED}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code >= 0:
        return code
    print(f"mirador: {describe_death(-code, log_file)}", file=sys.stderr)
    return 128 - code


def describe_death(signum: int, log_file: Path) -> str:
    """One line saying which signal stopped the node, what it likely was, and what to do."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
        where = "in llama.cpp" if crashed_in_llama(log_file) else "in native code"
        kind = f"native crash {where}"
    elif signum == signal.SIGKILL:
        kind = "killed from outside, e.g. by the kernel's out-of-memory killer"
    else:
        kind = "stopped by a signal it does not handle"
    return f"the node stopped: signal {signum} ({name}, {kind}); see {log_file}; run `mirador doctor`"


def crashed_in_llama(log_file: Path) -> bool:
    """True when the last fatal-error traceback in the log shows llama.cpp running in the crashing thread."""
    try:
        text = _tail(log_file, 64 * 1024)
    except OSError:
        return False
    dump = text.rpartition("Fatal Python error")[2]
    current = dump.partition("Current thread")[2].split("\n\n")[0]
    return bool(_LLAMA_FRAME.search(current))


def _tail(path: Path, size: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read().decode("utf-8", errors="replace")


def _forward_to(child: "subprocess.Popen[bytes]") -> Callable[[int, FrameType | None], None]:
    """A handler passing SIGINT and SIGTERM on; SIGHUP (the terminal closed) becomes a graceful SIGTERM."""

    def forward(signum: int, frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    return forward


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec hook: the child gets SIGKILL when `parent` dies (Linux); elsewhere nothing."""

    prctl = ctypes.CDLL(None).prctl if sys.platform == "linux" else None  # resolved before the fork

    def hook() -> None:
        if prctl is None:
            return
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the hook ran
            os._exit(1)

    return hook
