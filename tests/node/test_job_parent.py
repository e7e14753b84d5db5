"""A training job dies with the node that started it (no orphan keeps training after a node is killed)."""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a training job and the node that started it

# The "node": starts the real job entry point (`python -m node.training.job SPEC`) on a FIFO nobody has written, so
# the job blocks reading its spec, then waits to be killed.
PARENT = """
import subprocess, sys, time
job = subprocess.Popen([sys.executable, "-m", "node.training.job", sys.argv[1]], stdout=subprocess.DEVNULL)
print(job.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def open_when_read(fifo: Path, timeout: float) -> int:
    """Open `fifo` for writing once a reader has it open (the job is past its start-up), without writing."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_job_gets_sigterm_when_its_node_is_killed(tmp_path: Path) -> None:
    # Arrange: a "node" process whose job is running (it holds its spec FIFO open)
    fifo = tmp_path / "spec.json"
    os.mkfifo(fifo)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(fifo)], stdout=subprocess.PIPE, text=True)
    job, writer = 0, -1
    try:
        assert parent.stdout is not None
        job = int(parent.stdout.readline())
        writer = open_when_read(fifo, timeout=30)
        assert alive(job)
        # Act: the node is killed outright
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        # Assert: the job follows within seconds
        deadline = time.monotonic() + 10
        while alive(job) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(job)
    finally:
        parent.kill()
        parent.wait()
        if writer >= 0:
            os.close(writer)
        if job and alive(job):
            with contextlib.suppress(ProcessLookupError):
                os.kill(job, signal.SIGKILL)
