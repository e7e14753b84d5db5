"""The bwrap command line of one run: namespaces, read-only binds, the private /tmp and /scratch, and the bootstrap
that sets the limits inside (and, as root, drops to uid 65534) before it runs the code."""

import os
import sys
from contextlib import suppress
from pathlib import Path

from node.tools.sandbox.limits import Limits

NOBODY = 65534  # the code's uid when the node runs as root
MAIN = "/sandbox/main.py"
SCRATCH = "/scratch"
NOFILE = 256
MIB = 1 << 20

# Runs inside, before the code, as the same interpreter in isolated mode: the limits (inside the sandbox's user
# namespace, where RLIMIT_NPROC counts the sandbox's processes alone), no inherited descriptor, as root the uid drop
# (after which no user namespace can be made: max_user_namespaces = 0), a check that no capability is left, then the
# code as __main__, its tracebacks starting at its own frame.
_BOOT = """\
import os, resource as R, sys
for k, s, h in {limits}:
    m = R.getrlimit(k)[1]
    h = h if m == R.RLIM_INFINITY else min(h, m)
    R.setrlimit(k, (min(s, h), h))
os.closerange(3, 1 << 16)
if {drop}:
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.setgroups([]); os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})
os.chdir({cwd!r})
with open("/proc/self/status") as f:
    if any(int(l.split()[1], 16) for l in f if l.startswith(("CapEff", "CapPrm", "CapAmb"))):
        sys.exit("sandbox: capabilities left, not running the code")
sys.argv = [{main!r}]
def hook(t, e, tb, show=sys.__excepthook__):
    show(t, e.with_traceback(tb and tb.tb_next), tb and tb.tb_next)
sys.excepthook = hook
with open({main!r}, "rb") as f:
    c = compile(f.read(), {main!r}, "exec")
exec(c, {{"__name__": "__main__", "__file__": {main!r}, "__builtins__": __builtins__}})
"""


def bwrap_argv(
    bwrap: str, limits: Limits, scratch: Path | None, code_fd: int, info_fd: int, block_fd: int
) -> list[str]:
    """The command: `block_fd` >= 0 (as root) makes bwrap wait there for the parent's uid maps."""
    as_root = block_fd >= 0
    rlimits = [
        ("R.RLIMIT_CPU", limits.cpu_s, limits.cpu_s + 1),
        ("R.RLIMIT_AS", limits.memory_mb * MIB, limits.memory_mb * MIB),
        ("R.RLIMIT_NPROC", limits.processes, limits.processes),
        ("R.RLIMIT_FSIZE", limits.file_mb * MIB, limits.file_mb * MIB),
        ("R.RLIMIT_NOFILE", NOFILE, NOFILE),
        ("R.RLIMIT_CORE", 0, 0),
    ]
    boot = _BOOT.format(
        limits="(" + "".join(f"({k}, {s}, {h}), " for k, s, h in rlimits) + ")",
        drop=as_root,
        uid=NOBODY,
        main=MAIN,
        cwd=SCRATCH if scratch is not None else "/tmp",  # as the code's uid: a scratch folder may be 0700
    )
    argv = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    argv += ["--info-fd", str(info_fd), "--cap-drop", "ALL"]  # bwrap keeps every capability for root unless told
    if as_root:
        argv += ["--userns-block-fd", str(block_fd)]
        argv += [a for cap in ("SETUID", "SETGID", "SYS_RESOURCE") for a in ("--cap-add", f"CAP_{cap}")]
    else:
        argv += ["--disable-userns"]
    argv += _system()
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    argv += ["--perms", "1777", "--size", str(4 * limits.file_mb * MIB), "--tmpfs", "/tmp"]
    argv += _prefixes()  # after /tmp: an interpreter in a venv under /tmp would be hidden by the tmpfs
    argv += ["--perms", "0755", "--dir", "/sandbox", "--perms", "0444", "--ro-bind-data", str(code_fd), MAIN]
    if scratch is not None:
        argv += ["--bind", str(scratch), SCRATCH]
    argv += ["--remount-ro", "/", "--chdir", "/", "--clearenv"]
    for k, v in (("PATH", "/usr/bin:/bin"), ("HOME", "/tmp"), ("LANG", "C.UTF-8")):
        argv += ["--setenv", k, v]
    return [*argv, "--", sys.executable, "-I", "-B", "-c", boot]


def _system() -> list[str]:
    """The read-only system: /usr, the /lib and /bin links, what the dynamic linker and libc read in /etc."""
    argv = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--perms", "0755", "--dir", "/etc"]
    for etc in ("/etc/ld.so.cache", "/etc/localtime"):
        argv += ["--ro-bind-try", etc, etc]
    return argv


def _prefixes() -> list[str]:
    """The interpreter's prefixes, read-only (each parent folder made 0755: bwrap makes them 0700, closed to uid
    65534; an existing one, /tmp say, keeps its mode)."""
    argv: list[str] = []
    prefixes = {os.path.abspath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix)}
    made: set[str] = set()
    for p in sorted(prefixes):
        if p == "/usr" or p.startswith("/usr/") or any(p.startswith(q + "/") for q in prefixes):
            continue
        parents = [str(d) for d in reversed(Path(p).parents) if str(d) != "/" and str(d) not in made]
        made.update(parents)
        argv += [a for d in parents for a in ("--perms", "0755", "--dir", d)]
        argv += ["--ro-bind", p, p]
    return argv


def hand_over(scratch: Path) -> None:
    """As root the code runs as uid 65534: give it the scratch folder and what is in it. An earlier run may have left
    links there: fwalk holds each folder open (no link followed, none swapped in between) and chown does not follow."""
    os.chown(scratch, NOBODY, NOBODY)
    for _, dirs, files, dir_fd in os.fwalk(scratch):
        for name in dirs + files:
            with suppress(FileNotFoundError):
                os.chown(name, NOBODY, NOBODY, dir_fd=dir_fd, follow_symlinks=False)
