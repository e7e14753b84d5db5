"""The sandbox for untrusted code (issue 17): Python written by a model, or sympy expressions, run under bubblewrap.

Each run is a fresh `bwrap` (every namespace unshared: no network, its own pids, mounts, ipc and hostname) that sees
/usr, the /lib links, /etc/ld.so.cache and /etc/localtime, the interpreter's prefixes read-only (the venv's
site-packages included: sympy imports), a private /tmp and, when given, one scratch folder read-write at /scratch;
never MIRADOR_HOME or the project's checkout. A bootstrap inside, run by the same interpreter in isolated mode, sets
the rlimits (CPU, address space, processes, file size, open files, no core) and then runs the code; the parent
enforces the wall time and the output cap, and a kill takes the sandbox's pid 1 and with it the pid namespace.

RLIMIT_NPROC exempts a real uid 0, and set outside a user namespace it counts every process of the user. So it is set
inside (since Linux 5.14 it then counts the sandbox's own processes), and when the node runs as root the code runs as
uid 65534: bwrap still sets up as root (paths such as /root/.pyenv stay reachable), waits on --userns-block-fd while
the parent maps uids 0 and 65534 into its user namespace, and the bootstrap drops to 65534 (which clears its
capabilities); a scratch folder is then handed to 65534. Where the sandbox cannot start, every run is refused
(SandboxRefused, with why and what to do): nothing runs unsandboxed.

    command.py  the bwrap command line, the binds and the bootstrap
    process.py  one run's bwrap under the parent's watch (pumps, wall time, kill)
    probe.py    the trivial run behind `check()`, and the advice where it fails
"""

import os
import threading
import time
from pathlib import Path

import trio

from node.tools.sandbox.command import bwrap_argv, hand_over
from node.tools.sandbox.limits import Limits, Outcome, SandboxReason, SandboxRefused
from node.tools.sandbox.probe import probe
from node.tools.sandbox.process import run_bwrap

__all__ = ["Limits", "Outcome", "Sandbox", "SandboxReason", "SandboxRefused"]

TOOL_CALL = Limits()  # the defaults
RETRY_S = 60.0


class Sandbox:
    """Runs untrusted Python under bubblewrap with limits; refuses every run where the sandbox cannot start."""

    def __init__(self, bwrap: str = "bwrap", limits: Limits = TOOL_CALL) -> None:
        self.bwrap = bwrap
        self.limits = limits
        self._verdict: str | None = None  # "" = it works, else the refusal's detail
        self._probed = 0.0
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise SandboxRefused(UNAVAILABLE, why + what to do) unless a trivial sandboxed run works (a success is
        kept; a failure is probed again after RETRY_S, so a passing overload does not disable the tools)."""
        with self._lock:
            if self._verdict is None or (self._verdict and time.monotonic() - self._probed > RETRY_S):
                self._verdict = probe(self.bwrap, lambda: self._run("print('ok')", b"", None, Limits(wall_s=30)))
                self._probed = time.monotonic()
        if self._verdict:
            raise SandboxRefused(SandboxReason.UNAVAILABLE, self._verdict)

    async def run_python(
        self, code: str, *, stdin: bytes = b"", scratch: Path | None = None, limits: Limits | None = None
    ) -> Outcome:
        """Run `code` in the sandbox (cwd /scratch when given, else /tmp) and report how it ended."""
        if self._verdict != "":  # not known to work yet: probe (or re-probe) off the loop
            await trio.to_thread.run_sync(self.check)
        return await self._run(code, stdin, scratch, limits or self.limits)

    async def _run(self, code: str, stdin: bytes, scratch: Path | None, limits: Limits) -> Outcome:
        as_root = os.geteuid() == 0
        if scratch is not None:
            scratch = scratch.resolve()
            if not scratch.is_dir():
                raise ValueError(f"the sandbox's scratch folder is not a folder: {scratch}")
            if as_root:  # chowns what earlier runs left there: off the loop
                await trio.to_thread.run_sync(hand_over, scratch)
        source = code.encode()
        code_fd = os.memfd_create("sandbox-main.py")
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe() if as_root else (-1, -1)
        passed = tuple(fd for fd in (code_fd, info_w, block_r) if fd >= 0)
        try:
            view = memoryview(source)
            while view:
                view = view[os.write(code_fd, view) :]
            os.lseek(code_fd, 0, os.SEEK_SET)
            argv = bwrap_argv(self.bwrap, limits, scratch, code_fd, info_w, block_r)
        except BaseException:
            for fd in (*passed, info_r, block_w):
                if fd >= 0:
                    os.close(fd)
            raise
        return await run_bwrap(argv, passed, info_r, block_w, stdin, limits)  # closes them all
