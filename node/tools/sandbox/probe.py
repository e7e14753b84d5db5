"""Whether the sandbox starts here: one trivial sandboxed run, and where it fails, why and what to do."""

import shutil
import threading
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path

import trio

from node.tools.sandbox.limits import Outcome, SandboxRefused


def probe(bwrap: str, run: Callable[[], Awaitable[Outcome]]) -> str:
    """'' when `run` (a sandboxed `print('ok')`) prints ok, else why not and what to do, in words."""
    result: list[Outcome | BaseException] = []

    def in_thread() -> None:  # its own trio.run: the caller may be inside one
        try:
            result.append(trio.run(run))
        except BaseException as e:
            result.append(e)

    worker = threading.Thread(target=in_thread, name="sandbox-probe")
    worker.start()
    worker.join()
    got = result[0]
    if isinstance(got, Outcome) and got.ok() and got.stdout == "ok\n":
        return ""
    if shutil.which(bwrap) is None:
        why = f"bubblewrap is not installed ({bwrap!r} is not an executable file or on PATH)"
    elif isinstance(got, SandboxRefused):
        why = f"bubblewrap ({bwrap}) cannot be started: {got.detail}"
    elif isinstance(got, Outcome):
        last = (got.stderr.strip().splitlines() or [f"ended {got.ended}, exit code {got.exit_code}"])[-1]
        why = f"a trivial sandboxed run failed: {last}"
    else:
        why = f"a trivial sandboxed run failed: {got!r}"
    return f"{why}. {advice(why)} Untrusted code is never run outside the sandbox."


def _sysctl(name: str) -> str:
    with suppress(OSError):
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    return ""


def advice(why: str) -> str:
    """What to do about a sandbox that does not start."""
    if "not installed" in why:
        return "Install bubblewrap: `sudo apt-get install bubblewrap` (or run scripts/install.sh)."
    if "Unknown option" in why:
        return "This bubblewrap is too old: 0.8.0 or newer is needed (Debian 12, Ubuntu 24.04 and later have it)."
    if _sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return (
            "AppArmor forbids unprivileged user namespaces here (Ubuntu 23.10 and later): allow them to bwrap with a "
            "profile, /etc/apparmor.d/bwrap = `abi <abi/4.0>, include <tunables/global> profile bwrap /usr/bin/bwrap "
            "flags=(unconfined) { userns, }`, then `sudo apparmor_parser -r /etc/apparmor.d/bwrap`."
        )
    if _sysctl("user.max_user_namespaces") == "0":
        return "User namespaces are switched off: `sudo sysctl user.max_user_namespaces=15000`."
    if _sysctl("kernel.unprivileged_userns_clone") == "0":
        return "Unprivileged user namespaces are switched off: `sudo sysctl kernel.unprivileged_userns_clone=1`."
    return (
        "User namespaces may be blocked (a container's seccomp profile, a kernel without them): run the node where "
        "`bwrap --unshare-all --ro-bind / / true` works (Docker: `--security-opt seccomp=unconfined`)."
    )
