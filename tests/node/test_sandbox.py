"""The sandbox for untrusted code: what it runs (the interpreter, sympy, stdin, a scratch folder), what it keeps in
(MIRADOR_HOME, the network, the host's files, inherited descriptors, privileges, processes, CPU, memory, output), and
that it refuses to run anything where it cannot start."""

import enum
import functools
import json
import os
import resource
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from node.tools.sandbox import Limits, Outcome, Sandbox, SandboxReason, SandboxRefused

TIGHT = Limits(cpu_s=1, wall_s=3.0, processes=16)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    box = Sandbox()
    box.check()  # where bwrap cannot start, every test fails here with the refusal's advice
    return box


def pid_namespaces() -> dict[int, str]:
    """Every live process on the machine and its pid namespace (not zombies: the sandbox's pid 1 exits after its
    namespace is empty, and bwrap may leave it to the machine's init to reap)."""
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with suppress(OSError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    found[int(entry.name)] = os.readlink(f"/proc/{entry.name}/ns/pid")
    return found


@dataclass
class Watched:
    outcome: Outcome
    most_processes: int  # the most processes seen at once in pid namespaces new since the run started
    left: list[int]  # processes in those namespaces still there once run_python returned


def run(sandbox: Sandbox, code: str, **options: Any) -> Outcome:
    return trio.run(functools.partial(sandbox.run_python, code, **options))


def run_watched(sandbox: Sandbox, code: str, limits: Limits) -> Watched:
    """Run `code` while counting the sandbox's processes every 20 ms."""
    before = set(pid_namespaces().values())
    most = 0

    def fresh() -> list[int]:
        return [pid for pid, ns in pid_namespaces().items() if ns not in before]

    async def main() -> Outcome:
        nonlocal most
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal most
                while True:
                    most = max(most, len(fresh()))
                    await trio.sleep(0.02)

            nursery.start_soon(watch)
            outcome = await sandbox.run_python(code, limits=limits)
            nursery.cancel_scope.cancel()
        return outcome

    outcome = trio.run(main)
    return Watched(outcome, most, fresh())


# Positive: what the tools need works


def test_the_code_computes_and_prints(sandbox: Sandbox) -> None:
    # Arrange
    code = (
        "primes, n = [], 2\n"
        "while len(primes) < 1000:\n"
        "    if all(n % p for p in primes if p * p <= n):\n"
        "        primes.append(n)\n"
        "    n += 1\n"
        "print(sum(primes))\n"
    )
    # Act
    outcome = run(sandbox, code)
    # Assert
    assert outcome.ok(), outcome
    assert outcome.stdout == "3682913\n"
    assert (outcome.ended, outcome.exit_code, outcome.truncated) == ("exit", 0, False)


def test_sympy_imports_and_integrates_inside(sandbox: Sandbox) -> None:
    # Act
    outcome = run(sandbox, "import sympy\nx = sympy.Symbol('x')\nprint(sympy.integrate(x**2, (x, 0, 3)))")
    # Assert
    assert outcome.ok(), outcome.stderr
    assert outcome.stdout == "9\n"


def test_what_the_interpreter_reads_is_readable_by_the_code(sandbox: Sandbox) -> None:
    # Arrange: the dynamic linker's cache (a C extension loaded late), the time zone, the stdlib, the site-packages
    code = (
        "import os, sys, sysconfig\n"
        "paths = ['/etc/ld.so.cache', '/etc/localtime', sysconfig.get_path('stdlib'), sysconfig.get_path('purelib')]\n"
        "print([p for p in paths if not os.access(p, os.R_OK)])\n"
    )
    # Act
    outcome = run(sandbox, code)
    # Assert
    assert outcome.stdout == "[]\n", outcome


def test_stdin_reaches_the_code(sandbox: Sandbox) -> None:
    # Act
    outcome = run(sandbox, "import sys\nprint(sys.stdin.read()[::-1])", stdin=b"2 + 2")
    # Assert
    assert outcome.stdout == "2 + 2\n"


def test_files_written_in_the_scratch_folder_appear_there(sandbox: Sandbox, tmp_path: Path) -> None:
    # Arrange
    (tmp_path / "input.txt").write_text("from the host")
    code = "import os\nopen('out.txt', 'w').write(open('input.txt').read().upper())\nprint(os.getcwd())"
    # Act
    outcome = run(sandbox, code, scratch=tmp_path)
    # Assert
    assert outcome.ok(), outcome.stderr
    assert outcome.stdout == "/scratch\n"
    assert (tmp_path / "out.txt").read_text() == "FROM THE HOST"


def test_a_run_outlives_trios_idle_worker_threads(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: trio's idle worker threads end after 0.2 s instead of 10 s (--die-with-parent is PR_SET_PDEATHSIG: it
    # fires when the thread that started bwrap ends)
    monkeypatch.setattr(trio._core._thread_cache, "IDLE_TIMEOUT", 0.2)
    # Act
    outcome = run(sandbox, "import time\ntime.sleep(1.5)\nprint('slept')")
    # Assert
    assert outcome.ok() and outcome.stdout == "slept\n", outcome


def test_a_cancelled_run_leaves_no_process(sandbox: Sandbox) -> None:
    # Arrange
    before = set(pid_namespaces().values())

    async def main() -> None:
        with trio.move_on_after(1.0):
            await sandbox.run_python("import time\ntime.sleep(60)")

    # Act
    started = time.monotonic()
    trio.run(main)
    # Assert
    assert time.monotonic() - started < 2.5  # killed at the cancellation, not waited for
    assert [pid for pid, ns in pid_namespaces().items() if ns not in before] == []


def test_runs_cancelled_while_bwrap_starts_leave_no_process(sandbox: Sandbox) -> None:
    # Arrange: cancelled at once, and every 0.1 ms of the first few (bwrap between its clone and --info-fd, or its
    # child still waiting for bwrap to set it up)
    before = set(pid_namespaces().values())

    async def main() -> None:
        for i in range(60):
            with trio.move_on_after(i / 10000):
                await sandbox.run_python("print(1)")

    # Act
    trio.run(main)
    # Assert
    assert [pid for pid, ns in pid_namespaces().items() if ns not in before] == []


# Escapes: each refused or contained


class Fault(enum.Enum):
    """An attack, as the code the model would send (formatted with the test's paths and port)."""

    READ_IDENTITY = (
        "import os\n"
        "print(os.environ.get('MIRADOR_HOME'))\n"
        "for path in ({key!r}, '/proc/1/root' + {key!r}, '/proc/self/root' + {key!r}):\n"
        "    try:\n"
        "        print(open(path, 'rb').read().hex())\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n"
    )
    SOCKET = (
        "import socket\n"
        "for target in (('127.0.0.1', {port}), ('1.1.1.1', 53), '\\0' + {abstract!r}):\n"
        "    family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET\n"
        "    try:\n"
        "        with socket.socket(family) as s:\n"
        "            s.settimeout(2)\n"
        "            s.connect(target)\n"
        "        print('CONNECTED', target)\n"
        "    except OSError as e:\n"
        "        print('no connection:', type(e).__name__)\n"
        "try:\n"
        "    print('RESOLVED', socket.getaddrinfo('example.com', 80)[0][4])\n"
        "except OSError as e:\n"
        "    print('no name:', type(e).__name__)\n"
    )
    WRITE_OUTSIDE = (
        "for path in {paths!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('escaped')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n"
    )
    INHERITED_FDS = "import os\nprint(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))"
    PRIVILEGES = (
        "import ctypes, json, os\n"
        "caps = [l.split() for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapAmb'))]\n"
        "userns = ctypes.CDLL(None, use_errno=True).unshare(0x10000000)  # CLONE_NEWUSER: root in a namespace\n"
        "print(json.dumps({{'uid': os.getuid(), 'caps': [int(v, 16) for _, v in caps], 'userns': userns}}))\n"
    )
    FORK_BOMB = "import os\nwhile True:\n    os.fork()\n"
    INFINITE_LOOP = "while True:\n    pass\n"
    SLEEP_FOREVER = "import time\ntime.sleep(3600)\n"
    ALLOC_1GB = "b = bytearray(1 << 30)\nprint('allocated', len(b))\n"
    OUTPUT_100MB = "import sys\nsys.stdout.write('x' * 100_000_000)\n"


@dataclass
class Host:
    """What the attacks aim at on the test's machine."""

    home: Path  # a MIRADOR_HOME with an identity key
    key: bytes
    listener: socket.socket  # TCP on 127.0.0.1
    abstract: socket.socket  # an abstract unix socket (the network namespace's, not the filesystem's)
    writes: list[Path]  # where the code must not write

    def names(self) -> dict[str, Any]:
        return {
            "key": str(self.home / "identity.key"),
            "port": self.listener.getsockname()[1],
            "abstract": self.abstract.getsockname()[1:].decode(),
            "paths": [str(p) for p in self.writes],
        }

    def accepted(self) -> list[str]:
        """Connections either listener received."""
        got = []
        for s in (self.listener, self.abstract):
            with suppress(BlockingIOError):
                conn, addr = s.accept()
                conn.close()
                got.append(repr(addr))
        return got


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    # open to every uid (the code may run as another one): only the sandbox's view of the files may stop it
    shared = Path(tempfile.mkdtemp(prefix="mirador-sandbox-test-"))
    shared.chmod(0o777)
    home = shared / "mirador-home"
    home.mkdir(mode=0o755)
    key = secrets.token_bytes(32)
    (home / "identity.key").write_bytes(key)
    (home / "identity.key").chmod(0o644)
    monkeypatch.setenv("MIRADOR_HOME", str(home))
    listener = socket.create_server(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(b"\0mirador-sandbox-test-" + secrets.token_hex(8).encode())
    abstract.listen()
    for s in (listener, abstract):
        s.setblocking(False)
    marker = f"mirador-sandbox-escape-{secrets.token_hex(8)}"
    writes = [Path("/usr") / marker, shared / marker, Path.home() / marker]
    yield Host(home, key, listener, abstract, writes)
    listener.close()
    abstract.close()
    for p in writes:
        with suppress(OSError):
            p.unlink()
    shutil.rmtree(shared)


def contained_read_identity(w: Watched, host: Host) -> None:
    out = w.outcome.stdout + w.outcome.stderr
    assert host.key.hex() not in out and host.key not in out.encode(errors="replace")
    lines = w.outcome.stdout.splitlines()
    assert lines[:2] == ["None", "FileNotFoundError"]  # no MIRADOR_HOME in the environment, nor on the disk it sees
    assert len(lines) == 4 and set(lines[2:]) <= {"FileNotFoundError", "PermissionError"}  # through /proc


def contained_socket(w: Watched, host: Host) -> None:
    assert w.outcome.ok(), w.outcome.stderr
    assert "CONNECTED" not in w.outcome.stdout and "RESOLVED" not in w.outcome.stdout
    assert w.outcome.stdout.count("no connection:") == 3 and "no name:" in w.outcome.stdout
    assert host.accepted() == []


def contained_write_outside(w: Watched, host: Host) -> None:
    assert "WROTE" not in w.outcome.stdout
    assert len(w.outcome.stdout.split()) == len(host.writes)  # one error each
    assert [p for p in host.writes if p.exists()] == []


def contained_inherited_fds(w: Watched, host: Host) -> None:
    assert w.outcome.stdout == "[0, 1, 2, 3]\n"  # 3: the listing's own


def contained_privileges(w: Watched, host: Host) -> None:
    seen = json.loads(w.outcome.stdout)
    assert seen["uid"] == (65534 if os.geteuid() == 0 else os.geteuid())  # as root, the code runs as nobody
    assert seen["caps"] == [0, 0, 0]  # effective, permitted, ambient
    assert seen["userns"] == -1  # no user namespace of its own


def contained_fork_bomb(w: Watched, host: Host) -> None:
    assert "BlockingIOError" in w.outcome.stderr  # forks were refused by the process limit
    assert w.most_processes <= TIGHT.processes + 1  # + the sandbox's pid 1
    assert w.outcome.wall_s < TIGHT.wall_s + 2
    pid = os.fork()  # the test itself can still fork
    if pid == 0:
        os._exit(7)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7


def contained_infinite_loop(w: Watched, host: Host) -> None:
    assert w.outcome.ended in ("cpu_time", "wall_time") and w.outcome.exit_code is None
    assert w.outcome.wall_s < TIGHT.wall_s + 1


def contained_sleep_forever(w: Watched, host: Host) -> None:
    assert w.outcome.ended == "wall_time" and w.outcome.exit_code is None
    assert TIGHT.wall_s <= w.outcome.wall_s < TIGHT.wall_s + 1


def contained_alloc_1gb(w: Watched, host: Host) -> None:
    assert "allocated" not in w.outcome.stdout
    assert "MemoryError" in w.outcome.stderr or w.outcome.ended == "signal"


def contained_output_100mb(w: Watched, host: Host) -> None:
    assert (w.outcome.ended, w.outcome.truncated) == ("output_limit", True)
    assert len(w.outcome.stdout) == TIGHT.output_bytes
    assert w.outcome.wall_s < 2


CONTAINED: dict[Fault, Callable[[Watched, Host], None]] = {
    Fault.READ_IDENTITY: contained_read_identity,
    Fault.SOCKET: contained_socket,
    Fault.WRITE_OUTSIDE: contained_write_outside,
    Fault.INHERITED_FDS: contained_inherited_fds,
    Fault.PRIVILEGES: contained_privileges,
    Fault.FORK_BOMB: contained_fork_bomb,
    Fault.INFINITE_LOOP: contained_infinite_loop,
    Fault.SLEEP_FOREVER: contained_sleep_forever,
    Fault.ALLOC_1GB: contained_alloc_1gb,
    Fault.OUTPUT_100MB: contained_output_100mb,
}


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_an_escape_is_refused_or_contained(sandbox: Sandbox, host: Host, fault: Fault) -> None:
    # Arrange: the limits a tool call gets, tightened in time and processes; memory and output as by default
    code = fault.value.format(**host.names())
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Act
    watched = run_watched(sandbox, code, TIGHT)
    # Assert
    CONTAINED[fault](watched, host)
    assert watched.left == [], "a sandboxed process outlived its run"
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) * 1024 < 50 << 20  # never buffered it


# Unavailable: refused, never run outside


def test_without_bwrap_every_run_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    # Arrange
    box = Sandbox(bwrap="/nonexistent/bwrap")
    proof = tmp_path / "ran"
    # Act
    with pytest.raises(SandboxRefused) as checked:
        box.check()
    with pytest.raises(SandboxRefused) as ran:
        run(box, f"open({str(proof)!r}, 'w').write('ran')", scratch=tmp_path)
    # Assert
    for refused in (checked.value, ran.value):
        assert refused.reason == SandboxReason.UNAVAILABLE == "sandbox_unavailable"
        assert "bubblewrap is not installed" in refused.detail and "apt-get install bubblewrap" in refused.detail
    assert not proof.exists()


def test_a_bwrap_that_cannot_make_namespaces_is_refused_with_its_reason(tmp_path: Path) -> None:
    # Arrange: what bwrap says where user namespaces are forbidden (AppArmor on Ubuntu 24.04, a container)
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    proof = tmp_path / "ran"
    box = Sandbox(bwrap=str(fake))
    # Act
    with pytest.raises(SandboxRefused) as refused:
        run(box, f"open({str(proof)!r}, 'w').write('ran')")
    # Assert
    assert refused.value.reason == SandboxReason.UNAVAILABLE
    assert "setting up uid map: Permission denied" in refused.value.detail
    assert "never run outside the sandbox" in refused.value.detail
    assert not proof.exists()


def test_an_interpreter_in_a_venv_under_tmp_still_runs(tmp_path: Path) -> None:
    # Arrange: a venv in /tmp (a fresh clone's .venv there, as in CI) that reaches this one's packages and the node
    import site
    import subprocess
    import sys

    root = Path(tempfile.mkdtemp(prefix="mirador-venv-", dir="/tmp"))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
        purelib = Path(
            subprocess.check_output(
                [
                    str(root / "venv" / "bin" / "python"),
                    "-c",
                    "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                ],
                text=True,
            ).strip()
        )
        repo = Path(__file__).resolve().parents[2]
        (purelib / "mirador-test.pth").write_text(f"{site.getsitepackages()[0]}\n{repo}\n")
        probe = (
            "import trio, sys\nfrom node.tools.sandbox import Sandbox\n"
            "out = trio.run(Sandbox().run_python, 'import sys; print(sys.prefix)')\n"
            "print(out.ok(), out.stdout.strip(), sys.prefix, sep='|')"
        )
        # Act
        done = subprocess.run(
            [str(root / "venv" / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=120
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # Assert: the sandboxed code ran on the /tmp interpreter (the tmpfs at /tmp did not hide it)
    assert done.returncode == 0, done.stderr
    ok, inner, outer = done.stdout.strip().split("|")
    assert ok == "True" and inner == outer and outer.startswith("/tmp/mirador-venv-")
