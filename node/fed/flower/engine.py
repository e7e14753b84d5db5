"""Flower's deployment engine (flwr 1.42.0) as subprocesses: the scale-out path of a federation.

`mirador federation serve --engine flower` = a SuperLink (`start_superlink`) plus a run of Mirador's Flower app
(`run_app` on `node/fed/flower/app`, the ServerApp = the aggregator); `mirador federation join --engine flower
ADDRESS` = a SuperNode (`start_supernode`) whose ClientApp is the member trainer. `serve` and `join` below are
the blocking forms of both; `FlowerDeployment` starts any mix and stops everything on exit.

What flwr 1.42 runs (checked against each command's `--help`)
------------------------------------------------------------
- SuperLink: ONE port (`--host H --port P`, default 127.0.0.1:8000) serves the Fleet API (SuperNodes), the
  Control API (`flwr` CLI) and the Runtime API (ServerApp processes) over HTTP(S), plus `GET /health`.
  The old `--fleet-api-address`/`--control-api-address` are deprecated and `--serverappio-api-address` is
  refused. The SuperLink spawns `flower-superexec` (found on PATH, in its own session) which spawns one
  `flwr-serverapp` per run. `--disable-runtime-dependency-installation`: never `uv sync` a FAB's dependencies.
- SuperNode: `--superlink H:P` (Fleet API) and its own Runtime API port `--port Q` (default 9094: give every
  SuperNode on a machine its own), `--node-config FILE.toml` (or 'k="v" k2=1'); it spawns `flower-superexec`,
  which spawns one `flwr-clientapp` process per message (~5 s of torch imports each). It polls every 3 s.
- `flwr run APP CONNECTION` builds the FAB from APP and submits it; the connection is a `[superlink.NAME]`
  table (`address`, `insecure` or `root-certificates`) in `$FLWR_HOME/config.toml`. It returns at once;
  `flwr ls --run-id N --format json` gives the status (`finished:completed` when done).
  `flwr new` and the default `:local:` connection need the internet: never used here.
- Telemetry and the PyPI update check are switched off (`FLWR_TELEMETRY_ENABLED=0`, `FLWR_DISABLE_UPDATE_CHECK=1`).

TLS
---
The SuperLink needs all three files: `flower-superlink --ssl-ca-certfile ca.pem --ssl-certfile server.pem
--ssl-keyfile server.key` (one certificate for all three APIs; it must name the address SuperNodes and its own
SuperExec dial, e.g. SAN IP:127.0.0.1 or the DNS name); without `--insecure` and without them it refuses to
start. SuperNodes verify it with `flower-supernode --root-certificates ca.pem --superlink HOST:PORT` (with
neither `--root-certificates` nor `--insecure` they use the system's CA store); the CLI with
`root-certificates = "ca.pem"` in its connection. Here: `start_superlink(..., tls=TlsFiles(ca, cert, key))`,
`start_supernode(..., root_certificates=ca)`, `Connection(address, ca)`; `make_test_certificates` writes a
throwaway CA and server certificate for tests.

SuperNode authentication
------------------------
`flower-superlink --enable-supernode-auth` (requires TLS; without it only `--insecure` runs and any SuperNode is
accepted). Each SuperNode has an EC key pair on a NIST curve (P-384), OpenSSH format (`ssh-keygen -t ecdsa -b 384
-N "" -f supernode_1`, or `make_supernode_keys`); the operator registers the public key with the SuperLink:
`flwr supernode register supernode_1.pub CONNECTION` (`register_supernode`); the SuperNode starts with
`flower-supernode --auth-supernode-private-key supernode_1` (`start_supernode(..., auth_private_key=...)`).
The old `--auth-list-public-keys` (SuperLink) is refused and `--auth-supernode-public-key` (SuperNode) is
deprecated in 1.42. `flwr supernode ls` / `unregister NODE_ID` manage registrations.
"""

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import tomli_w

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
CONNECTION_NAME = "mirador"
DEFAULT_SUPERLINK_PORT = 9092  # Mirador's choice (flwr's default, 8000, collides with many dev servers)
TERMINAL_PREFIX = "finished"  # run statuses: pending, starting, running, finished:{completed,failed,stopped}
ConfigValue = str | int | float | bool


class FlowerEngineError(RuntimeError):
    """A Flower process failed to start, a CLI call failed, or a run did not finish in time."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS SuperLink: the CA that signed the server certificate, the certificate, its key."""

    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Connection:
    """How the `flwr` CLI (and health checks) reach a SuperLink: `host:port`, plus the CA for TLS.

    `insecure=None` (default): plain HTTP unless `root_certificates` is given. `insecure=False` without
    `root_certificates`: TLS verified against the system's CA store (a SuperLink with a public certificate).
    """

    address: str
    root_certificates: Path | None = None
    insecure: bool | None = None

    @property
    def plain(self) -> bool:
        """Whether this connection is plain HTTP (an `--insecure` SuperLink)."""
        return self.root_certificates is None if self.insecure is None else self.insecure

    def url(self, path: str) -> str:
        """`http(s)://address/path`."""
        return f"{'http' if self.plain else 'https'}://{self.address}/{path.lstrip('/')}"

    def toml(self) -> dict[str, Any]:
        """The `$FLWR_HOME/config.toml` selecting this SuperLink by default."""
        table: dict[str, Any] = {"address": self.address}
        if self.plain:
            table["insecure"] = True
        elif self.root_certificates:
            table["root-certificates"] = str(Path(self.root_certificates).resolve())
        return {"superlink": {"default": CONNECTION_NAME, CONNECTION_NAME: table}}


def _as_connection(connection: "Connection | str") -> Connection:
    return connection if isinstance(connection, Connection) else Connection(connection)


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
    root = str(Path(__file__).resolve().parents[3])  # the checkout: node/fed/flower/engine.py
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


def _spawn(
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


def start_superlink(
    workdir: Path,
    port: int | None = None,
    host: str = "127.0.0.1",
    *,
    tls: TlsFiles | None = None,
    enable_supernode_auth: bool = False,
    database: Path | None = None,
    name: str = "superlink",
) -> FlowerProcess:
    """Start `flower-superlink` (plain HTTP unless `tls`); its log is `workdir/NAME.log`, its FLWR_HOME
    `workdir/flwr-home`. `database`: an SQLite file for runs and registered SuperNodes (default: in memory).
    The handle's `address` is where local clients dial it (loopback for a wildcard `host`; with TLS the
    certificate must name it too)."""
    if enable_supernode_auth and tls is None:
        raise FlowerEngineError(
            "SuperNode authentication needs TLS (flwr refuses --enable-supernode-auth with --insecure)"
        )
    port = port or free_port(host)
    args = [
        executable("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    if enable_supernode_auth:
        args.append("--enable-supernode-auth")
    if database is not None:
        args += ["--database", str(database)]
    return _spawn(name, args, workdir, _dial_address(host, port))


def _dial_address(host: str, port: int) -> str:
    """Where a local client reaches a server bound to host:port (loopback for a wildcard bind)."""
    if host in ("0.0.0.0", ""):  # only maps an explicit wildcard bind to a loopback dial; defaults are 127.0.0.1
        return f"127.0.0.1:{port}"
    if host in ("::", "[::]"):
        return f"[::1]:{port}"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def start_supernode(
    workdir: Path,
    superlink_address: str,
    node_config: Mapping[str, ConfigValue],
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    root_certificates: Path | None = None,
    insecure: bool | None = None,
    auth_private_key: Path | None = None,
    max_wait_time: float | None = None,
    name: str = "supernode",
) -> FlowerProcess:
    """Start `flower-supernode` connecting to `superlink_address` (host:port of the SuperLink).

    `node_config` reaches the ClientApp as `context.node_config` (Mirador's: `data`, and `base` or `models`; see
    `node.fed.flower.app.client`); it is written to `workdir/NAME.node-config.toml`. `port`: this SuperNode's Runtime
    API port (free one by default). TLS verified with `root_certificates` (the SuperLink's CA) when given; without
    it `--insecure` (plain HTTP), unless `insecure=False`: TLS verified against the system's CA store.
    `max_wait_time`: give up after that many seconds without a SuperLink (default: retry for ever).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / f"{name}.node-config.toml"
    config_file.write_text(tomli_w.dumps(dict(node_config)), encoding="utf-8")
    port = port or free_port(host)
    args = [
        executable("flower-supernode"),
        "--superlink",
        superlink_address,
        "--host",
        host,
        "--port",
        str(port),
        "--node-config",
        str(config_file),
    ]
    if root_certificates is not None:
        args += ["--root-certificates", str(root_certificates)]
    elif insecure is not False:
        args.append("--insecure")
    if auth_private_key is not None:
        args += ["--auth-supernode-private-key", str(auth_private_key)]
    if max_wait_time is not None:
        args += ["--max-wait-time", str(max_wait_time)]
    home = workdir / f"{name}-flwr-home"
    return _spawn(name, args, workdir, _dial_address(host, port), flower_env(home))


def wait_health(connection: "Connection | str", timeout: float = 60.0, process: FlowerProcess | None = None) -> None:
    """Wait until the SuperLink answers `GET /health` with 200; FlowerEngineError (with the log) if it exits first
    or `timeout` s pass."""
    conn = _as_connection(connection)
    verify: ssl.SSLContext | bool = (
        False if conn.plain else ssl.create_default_context(cafile=str(conn.root_certificates or "") or None)
    )
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise FlowerEngineError(f"{process.name} exited with {process.popen.returncode}:\n{process.log_text()}")
        try:
            if httpx.get(conn.url("/health"), timeout=2.0, verify=verify).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    tail = f"\n{process.log_text()}" if process is not None else ""
    raise FlowerEngineError(f"no healthy SuperLink at {conn.url('/health')} after {timeout:.0f} s ({last}){tail}")


# ------------------------------------------------------------------------------------------------- the flwr CLI


@contextlib.contextmanager
def _cli_home(connection: Connection) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mirador-flwr-cli-") as tmp:
        home = Path(tmp)
        (home / "config.toml").write_text(tomli_w.dumps(connection.toml()), encoding="utf-8")
        yield home


def flwr_cli(
    connection: "Connection | str",
    args: Sequence[str],
    timeout: float = 60.0,
    run_config: Mapping[str, ConfigValue] | None = None,
) -> str:
    """Run `flwr ARGS` against the connection (a throwaway FLWR_HOME holds its config.toml); its stdout.
    `run_config` is written to a TOML file and passed as `--run-config FILE`."""
    conn = _as_connection(connection)
    with _cli_home(conn) as home:
        argv = [executable("flwr"), *args]
        if run_config is not None:
            run_file = home / "run-config.toml"
            run_file.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
            argv += ["--run-config", str(run_file)]
        try:
            done = subprocess.run(
                argv,
                env=flower_env(home, {"COLUMNS": "200"}),
                capture_output=True,
                timeout=timeout,
                cwd=home,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise FlowerEngineError(f"{' '.join(args[:2])} timed out after {timeout:.0f} s") from exc
    out, err = done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
    if done.returncode != 0:
        raise FlowerEngineError(f"flwr {' '.join(args)} exited with {done.returncode}:\n{out}\n{err}")
    return out


def _json_out(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise FlowerEngineError(f"flwr printed no JSON:\n{text}")
    value = json.loads(text[start:])
    if not isinstance(value, dict) or value.get("success") is False:
        raise FlowerEngineError(f"flwr reported a failure:\n{text}")
    return value


def run_app(
    connection: "Connection | str",
    run_config: Mapping[str, ConfigValue] | None = None,
    app_dir: Path | None = None,
    timeout: float = 120.0,
) -> int:
    """Submit a run of the Flower app in `app_dir` (default: Mirador's `node/fed/flower/app`) with `run_config`
    overrides (keys of its `[tool.flwr.app.config]`); the run id. Returns once the SuperLink accepted the run."""
    from node.fed.flower.app import APP_DIR

    app = Path(app_dir or APP_DIR).resolve()
    out = flwr_cli(
        connection, ["run", str(app), CONNECTION_NAME, "--format", "json"], timeout, run_config=run_config or {}
    )
    return int(_json_out(out)["run-id"])


def run_status(connection: "Connection | str", run_id: int, timeout: float = 60.0) -> str:
    """The run's status: `pending`, `starting`, `running`, or `finished:completed|failed|stopped`."""
    out = flwr_cli(connection, ["ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"], timeout)
    runs = _json_out(out).get("runs") or []
    if not runs:
        raise FlowerEngineError(f"the SuperLink knows no run {run_id}")
    return str(runs[0]["status"])


def wait_run(
    connection: "Connection | str",
    run_id: int,
    timeout: float,
    poll: float = 2.0,
    processes: Sequence[FlowerProcess] = (),
) -> str:
    """Poll until the run finishes; its final status. FlowerEngineError after `timeout` s, or when one of
    `processes` (the SuperLink, say) exits meanwhile."""
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        for p in processes:
            if not p.alive():
                raise FlowerEngineError(f"{p.name} exited with {p.popen.returncode} during run {run_id}")
        status = run_status(connection, run_id, timeout=max(5.0, min(60.0, deadline - time.monotonic())))
        if status.startswith(TERMINAL_PREFIX):
            return status
        time.sleep(poll)
    raise FlowerEngineError(f"run {run_id} still {status} after {timeout:.0f} s")


def run_logs(connection: "Connection | str", run_id: int, timeout: float = 30.0) -> str:
    """The ServerApp's log of a run (`flwr log RUN_ID --show`)."""
    return flwr_cli(connection, ["log", str(run_id), CONNECTION_NAME, "--show"], timeout)


def stop_run(connection: "Connection | str", run_id: int, timeout: float = 30.0) -> None:
    """Ask the SuperLink to stop a run."""
    flwr_cli(connection, ["stop", str(run_id), CONNECTION_NAME], timeout)


def register_supernode(connection: "Connection | str", public_key: Path, timeout: float = 30.0) -> dict[str, Any]:
    """Register a SuperNode's public key (OpenSSH, NIST EC curve) with a SuperLink running
    `--enable-supernode-auth` (`flwr supernode register KEY CONNECTION`); flwr's JSON answer."""
    out = flwr_cli(connection, ["supernode", "register", str(public_key), CONNECTION_NAME, "--format", "json"], timeout)
    return _json_out(out)


# ------------------------------------------------------------------------------------------------ key material


def make_supernode_keys(folder: Path, name: str = "supernode") -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format for SuperNode authentication: (private key 0600, public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


def make_test_certificates(folder: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 2) -> TlsFiles:
    """A throwaway CA and a server certificate for `hosts` (IPs or DNS names), for tests on loopback only."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mirador test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.key.chmod(0o600)
    return files


# ------------------------------------------------------------------------------------------- deployments


class FlowerDeployment:
    """Processes started together under `workdir` (one subfolder each) and stopped together, newest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.processes: list[FlowerProcess] = []

    def superlink(self, **kwargs: Any) -> FlowerProcess:
        """`start_superlink(workdir/superlink, **kwargs)`, waiting for its health endpoint."""
        tls: TlsFiles | None = kwargs.get("tls")
        proc = start_superlink(self.workdir / kwargs.get("name", "superlink"), **kwargs)
        self.processes.append(proc)
        assert proc.address is not None
        wait_health(Connection(proc.address, tls.ca_cert if tls else None), process=proc)
        return proc

    def supernode(self, superlink_address: str, node_config: Mapping[str, ConfigValue], **kwargs: Any) -> FlowerProcess:
        """`start_supernode(workdir/NAME, ...)` (NAME from kwargs, default supernode-N)."""
        name = kwargs.pop("name", f"supernode-{sum(p.name.startswith('supernode') for p in self.processes) + 1}")
        proc = start_supernode(self.workdir / name, superlink_address, node_config, name=name, **kwargs)
        self.processes.append(proc)
        return proc

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process, newest first."""
        for proc in reversed(self.processes):
            proc.stop(timeout)

    def logs(self) -> str:
        """Every process's log tail, for error reports."""
        return "\n".join(f"===== {p.name} ({p.log_path}) =====\n{p.log_text()}" for p in self.processes)

    def __enter__(self) -> "FlowerDeployment":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve(
    workdir: Path,
    run_config: Mapping[str, ConfigValue],
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    tls: TlsFiles | None = None,
    enable_supernode_auth: bool = False,
    supernode_public_keys: Sequence[Path] = (),
    timeout: float = 24 * 3600.0,
) -> dict[str, Any]:
    """`mirador federation serve --engine flower`: a SuperLink on host:port, then one run of Mirador's app with
    `run_config` (its `out` folder is set to `workdir/result` unless given); blocks until the run finishes and
    returns the ServerApp's summary. SuperNodes join with `join(...)` meanwhile (they are waited for up to the
    run config's `node-wait`). Everything is stopped on return."""
    config = dict(run_config)
    config.setdefault("out", str((workdir / "result").resolve()))
    with FlowerDeployment(workdir) as dep:
        link = dep.superlink(host=host, port=port, tls=tls, enable_supernode_auth=enable_supernode_auth)
        assert link.address is not None
        conn = Connection(link.address, tls.ca_cert if tls else None)
        for key in supernode_public_keys:
            register_supernode(conn, key)
        run_id = run_app(conn, config)
        status = wait_run(conn, run_id, timeout, processes=[link])
        if status != "finished:completed":
            raise FlowerEngineError(f"run {run_id} ended {status}:\n{run_logs(conn, run_id)}")
    summary: dict[str, Any] = json.loads((Path(str(config["out"])) / "summary.json").read_text(encoding="utf-8"))
    return summary


def join(
    workdir: Path,
    superlink_address: str,
    node_config: Mapping[str, ConfigValue],
    *,
    root_certificates: Path | None = None,
    insecure: bool | None = None,
    auth_private_key: Path | None = None,
    port: int | None = None,
) -> int:
    """`mirador federation join --engine flower ADDRESS`: a SuperNode until it exits or the caller is interrupted
    (Ctrl-C / SIGTERM stop it and its ClientApp processes); its exit code. `node_config`: `data` (this member's
    training file) and `base` or `models` (see `node.fed.flower.app.client`)."""
    proc = start_supernode(
        workdir,
        superlink_address,
        node_config,
        port=port,
        root_certificates=root_certificates,
        insecure=insecure,
        auth_private_key=auth_private_key,
    )
    try:
        return proc.popen.wait()
    finally:
        proc.stop()
