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
`start_supernode(..., root_certificates=ca)`, `Connection(address, ca)`; tests/flower_keys.py writes a throwaway
CA and server certificate for tests.

SuperNode authentication
------------------------
`flower-superlink --enable-supernode-auth` (requires TLS; without it only `--insecure` runs and any SuperNode is
accepted). Each SuperNode has an EC key pair on a NIST curve (P-384), OpenSSH format (`ssh-keygen -t ecdsa -b 384
-N "" -f supernode_1`, or tests/flower_keys.py); the operator registers the public key with the SuperLink:
`flwr supernode register supernode_1.pub CONNECTION` (`register_supernode`); the SuperNode starts with
`flower-supernode --auth-supernode-private-key supernode_1` (`start_supernode(..., auth_private_key=...)`).
The old `--auth-list-public-keys` (SuperLink) is refused and `--auth-supernode-public-key` (SuperNode) is
deprecated in 1.42. `flwr supernode ls` / `unregister NODE_ID` manage registrations.
"""

import json
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import tomli_w

from node.fed.flower.cli import ConfigValue, Connection, as_connection, register_supernode, run_app, run_logs, wait_run
from node.fed.flower.processes import FlowerEngineError, FlowerProcess, executable, flower_env, free_port, spawn

DEFAULT_SUPERLINK_PORT = 9092  # Mirador's choice (flwr's default, 8000, collides with many dev servers)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS SuperLink: the CA that signed the server certificate, the certificate, its key."""

    ca_cert: Path
    cert: Path
    key: Path


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
    return spawn(name, args, workdir, _dial_address(host, port))


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
    return spawn(name, args, workdir, _dial_address(host, port), flower_env(home))


def wait_health(connection: "Connection | str", timeout: float = 60.0, process: FlowerProcess | None = None) -> None:
    """Wait until the SuperLink answers `GET /health` with 200; FlowerEngineError (with the log) if it exits first
    or `timeout` s pass."""
    conn = as_connection(connection)
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
