"""The `flwr` CLI as functions: a connection to a SuperLink (its `$FLWR_HOME/config.toml`), run an app, its status,
logs, stop, and SuperNode registration."""

import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from node.fed.flower.processes import FlowerEngineError, FlowerProcess, executable, flower_env

CONNECTION_NAME = "mirador"
ConfigValue = str | int | float | bool
TERMINAL_PREFIX = "finished"  # run statuses: pending, starting, running, finished:{completed,failed,stopped}


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


def as_connection(connection: "Connection | str") -> Connection:
    """A Connection, from itself or a plain `host:port` address."""
    return connection if isinstance(connection, Connection) else Connection(connection)


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
    conn = as_connection(connection)
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
