"""One run's bwrap process under the parent's watch: stdin fed, stdout and stderr read concurrently up to the cap,
pid 1 of the sandbox found on --info-fd (as root: its uid maps written while bwrap waits), the wall time, and the
kill: SIGKILL to that pid 1 takes its whole pid namespace; the run returns once pid 1 is dead, which the kernel makes
happen after every other process of the namespace.

bwrap is started from the calling thread (the trio loop's), not as trio.open_process does it from a worker thread:
--die-with-parent is PR_SET_PDEATHSIG, which fires when the *thread* that forked bwrap ends, and trio's idle worker
threads end after 10 s, which would kill every run at 10 s. Here the sandbox dies with the loop that runs it."""

import json
import os
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import trio

from node.tools.sandbox.command import NOBODY
from node.tools.sandbox.limits import Limits, Outcome, SandboxReason, SandboxRefused

_STATUS_SIGNALS = range(129, 129 + 64)  # bwrap reports its command's death by signal n as 128 + n, as a shell does


async def run_bwrap(
    argv: list[str], passed: tuple[int, ...], info_r: int, block_w: int, stdin: bytes, limits: Limits
) -> Outcome:
    """Start `argv` (handing it the descriptors `passed`), watch it to its end, say how it ended. Every descriptor
    given is closed here: `passed` once bwrap has started, `info_r` and `block_w` (-1 unless as root: the parent's
    ends of --info-fd and --userns-block-fd) at the end."""
    started = time.monotonic()
    (in_r, in_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
    try:
        popen = subprocess.Popen(argv, stdin=in_r, stdout=out_w, stderr=err_w, pass_fds=passed, start_new_session=True)
    except OSError as e:
        for fd in (in_w, out_r, err_r, info_r, block_w):
            if fd >= 0:
                os.close(fd)
        raise SandboxRefused(SandboxReason.UNAVAILABLE, f"bwrap cannot start ({e}); nothing ran") from e
    finally:
        for fd in (*passed, in_r, out_w, err_w):  # bwrap has its own copies (and --info-fd's EOF needs ours closed)
            os.close(fd)
    run = _Watch(popen, in_w, out_r, err_r, info_r, block_w)
    try:
        await run.watch(stdin, limits)
    finally:
        await run.close()
    if run.map_error:
        raise SandboxRefused(SandboxReason.UNAVAILABLE, f"cannot map the sandbox's uids ({run.map_error}); nothing ran")
    rc = popen.returncode
    exit_code: int | None = None
    if run.killed_for is not None:
        ended = run.killed_for
    elif rc is None or rc < 0:
        ended = "signal"
    elif rc in _STATUS_SIGNALS:
        ended = "cpu_time" if rc - 128 == signal.SIGXCPU else "signal"
    else:
        ended, exit_code = "exit", rc
    out, err = run.outputs
    return Outcome(
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        exit_code=exit_code,
        ended=ended,
        truncated=run.truncated,
        wall_s=time.monotonic() - started,
    )


class _Watch:
    """The parent's side of one bwrap: its pipes, the pumps, pid 1 and the kill."""

    def __init__(
        self, popen: subprocess.Popen[bytes], in_w: int, out_r: int, err_r: int, info_r: int, block_w: int
    ) -> None:
        self.popen = popen
        self.bwrap_fd = os.pidfd_open(popen.pid)  # not reaped before it is readable: the pid cannot be reused
        self.stdin = trio.lowlevel.FdStream(in_w)
        self.stdout = trio.lowlevel.FdStream(out_r)
        self.stderr = trio.lowlevel.FdStream(err_r)
        self.info = trio.lowlevel.FdStream(info_r)  # open until the end: closed early, bwrap dies writing to it
        self.block_w = block_w
        self.pidfd = -1  # the sandbox's pid 1
        self.early: list[int] = []  # pidfds of bwrap's children killed before --info-fd named pid 1
        self.killed_for: str | None = None
        self.truncated = False
        self.map_error = ""
        self.outputs = (b"", b"")

    def kill(self, why: str) -> None:
        """SIGKILL to the sandbox's pid 1 (bwrap reaps it and exits); the first reason stays."""
        if self.killed_for is None:
            self.killed_for = why
        if self.pidfd >= 0:
            with suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        elif self.popen.returncode is None:
            self._kill_early()
        if self.block_w >= 0:  # only now: a bwrap freed from waiting for its uid maps can exit and orphan its child
            os.close(self.block_w)
            self.block_w = -1

    def _kill_early(self) -> None:
        """Before --info-fd named pid 1: bwrap's child waits on an eventfd for bwrap until it has set itself up, and
        with bwrap dead it would wait forever (its --die-with-parent is not set yet). So bwrap is stopped (it cannot
        clone while stopped), its child, if any, killed, then bwrap. A SIGKILL is not a death: the run waits on each
        child's pidfd too, or it could return while that child is still dying."""
        pid = self.popen.pid
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            os.waitid(os.P_PID, pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)  # stopped (or dead) now, not later
            with suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                    fd = os.pidfd_open(int(child))  # bwrap is stopped, so its child cannot be reaped meanwhile
                    self.early.append(fd)
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        with suppress(ProcessLookupError):
            self.popen.kill()

    async def watch(self, stdin: bytes, limits: Limits) -> None:
        """Feed stdin, read both outputs up to the cap, let the sandbox start, wait for its end or the wall time."""
        outputs: list[bytes] = [b"", b""]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._feed, stdin)
            for i, stream in enumerate((self.stdout, self.stderr)):
                nursery.start_soon(self._pump, stream, limits.output_bytes, outputs, i)
            with trio.move_on_after(limits.wall_s) as timer:
                await self._start()
                await self._ended()
            if timer.cancelled_caught:
                self.kill("wall_time")
                await self._reap()
        self.outputs = (outputs[0], outputs[1])

    async def _start(self) -> None:
        info = b""
        while chunk := await self.info.receive_some():  # EOF: bwrap has written pid 1's number and closed its end
            info += chunk
        try:
            pid = int(json.loads(info)["child-pid"])
        except (ValueError, KeyError, TypeError):
            return  # bwrap failed before: its stderr says why
        if self.killed_for is not None:
            return  # killed before: bwrap and its child are gone, and that pid may be another process's by now
        with suppress(ProcessLookupError):
            self.pidfd = os.pidfd_open(pid)
        if self.block_w >= 0:  # as root: uid 0 for bwrap's setup, 65534 for the code
            try:
                for name in ("uid_map", "gid_map"):
                    Path(f"/proc/{pid}/{name}").write_text(f"0 0 1\n{NOBODY} {NOBODY} 1\n")
            except OSError as e:
                self.map_error = str(e)
                self.kill("signal")
                return
            os.write(self.block_w, b"1")
            os.close(self.block_w)
            self.block_w = -1

    async def _reap(self) -> None:
        with trio.move_on_after(5):
            await self._ended()
            return
        self.popen.kill()  # not expected: bwrap outliving its pid 1
        await self._ended()

    async def _ended(self) -> None:
        if self.popen.returncode is None:
            await trio.lowlevel.wait_readable(self.bwrap_fd)
            self.popen.wait()
        for fd in (self.pidfd, *self.early):  # readable once pid 1 is dead, after every other process of its namespace
            if fd >= 0:
                await trio.lowlevel.wait_readable(fd)

    async def _feed(self, data: bytes) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if data:
                await self.stdin.send_all(data)
            await self.stdin.aclose()

    async def _pump(self, stream: trio.abc.ReceiveStream, cap: int, outputs: list[bytes], i: int) -> None:
        buf = bytearray()
        while chunk := await stream.receive_some(65536):
            if len(buf) + len(chunk) > cap and not self.truncated:
                self.truncated = True
                self.kill("output_limit")
            buf += chunk[: max(0, cap - len(buf))]
        outputs[i] = bytes(buf)

    async def close(self) -> None:
        """Kill what is left (a cancelled run), reap it, close the descriptors."""
        if self.popen.returncode is None:
            self.kill(self.killed_for or "signal")
            with trio.CancelScope(shield=True):
                await self._reap()
        for fd in (self.block_w, self.pidfd, self.bwrap_fd, *self.early):
            if fd >= 0:
                os.close(fd)
        for stream in (self.info, self.stdin, self.stdout, self.stderr):
            await trio.aclose_forcefully(stream)
