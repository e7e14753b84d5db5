"""A training job dies with the node that started it (no orphan keeps training after a node is killed)."""

import os
import signal
import subprocess
import sys
import time

CHILD = (
    "from node.training.job import die_with_parent; import time; "
    "die_with_parent(); print('ready', flush=True); time.sleep(60)"
)
PARENT = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init counts as gone
        return f.read().split(") ")[1][0] != "Z"


def test_the_job_gets_sigterm_when_its_node_is_killed() -> None:
    # Arrange: a "node" process that started a job process
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        # Act: the node is killed outright
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        # Assert: the job follows within seconds
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        parent.kill()
        parent.wait()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)
