"""The daemon: one trio loop hosting the inference engine and the HTTP API (and, later, the libp2p host).

Order in the root nursery (see docs/ARCHITECTURE.md): signal receiver first, then the engine, then hypercorn.
On SIGINT/SIGTERM the engine stops taking work, running streams get `api.shutdown_grace_s` to finish and are
then cut with a final error event and `[DONE]`; then hypercorn closes and the process exits 0.
"""

import faulthandler
import io
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from crypto.identity import Identity
from federation.policy import PrivacyPolicy
from node.adapters.personalities import ManifestFile
from node.adapters.store import AdapterStore
from node.agents.alerts import AlertStore
from node.agents.runtime import node_runtime
from node.agents.service import AgentService
from node.agents.watch import watch
from node.api.app import create_app
from node.core.api_token import load_or_create_token
from node.core.config import ConfigError, NodeConfig, load_config
from node.core.fsutil import atomic_write_text
from node.core.home import NodeHome
from node.core.identity_file import IdentityFileError, load_or_create_identity
from node.core.profiles import PROFILES_DIR, effective_settings
from node.core.runlock import AlreadyRunningError, RunLock
from node.fed.dht import federation_validators
from node.fed.node import FederationNode
from node.inference.engine import InferenceEngine
from node.inference.extra_buffers import ProbeError, Setting, Verdict, choose
from node.inference.models import BaseModel, ModelNotFoundError, resolve_model
from node.market.registry_dht import registry_node
from node.market.service import MarketService
from node.memory.service import MemoryService
from node.p2p.host import P2PConfig, P2PError, P2PNode  # before logging: importing libp2p resets its logger
from node.p2p.notices import NoticeBoard
from node.state import NodeState
from node.tools.service import ToolService
from node.training.feedback import FeedbackDB
from node.training.service import TrainingService

log = logging.getLogger("mirador.daemon")
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class StartOptions:
    """Command-line choices for `mirador node start`."""

    profile: str | None = None


class _Libp2pChurn(logging.Filter):
    """Leaves out py-libp2p's records below ERROR: some of its loggers set their own level (the auto-connector logs
    "initiating 32 new dials" at INFO every 10 s on a node with no peers), so a level on "libp2p" is not enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record unless it is py-libp2p's and below ERROR."""
        return record.levelno >= logging.ERROR or not (record.name == "libp2p" or record.name.startswith("libp2p."))


def setup_logging(level: str, log_file: Path | None = None) -> None:
    """Log to stderr with timestamps, and to `log_file` too unless stderr already is that file (--detach); a native
    crash's traceback goes to `log_file` (faulthandler). py-libp2p's own records only at debug level, or from ERROR
    up."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        crash_file = sys.stderr if _is_same_file(sys.stderr, log_file) else _open_log(log_file)
        if crash_file is not sys.stderr:
            handlers.append(logging.StreamHandler(crash_file))
        faulthandler.enable(file=crash_file, all_threads=True)
    debug = level.lower() == "debug"
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        if not debug:
            handler.addFilter(_Libp2pChurn())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=handlers, force=True)
    # py-libp2p's "libp2p" logger does not propagate and has no handler, so its records reached stderr bare,
    # through logging's last-resort handler. They now go through ours. Its warnings are network churn logged per
    # attempt (a gone peer's failed dials and DHT streams, one per message a flooding peer sends beyond gossipsub's
    # limit): thousands of lines in a busy hour. The node reports what matters itself (failed connects, refused and
    # blacklisted peers), so below debug level they are left out.
    libp2p = logging.getLogger("libp2p")
    libp2p.propagate = True
    libp2p.setLevel(logging.DEBUG if debug else logging.ERROR)


_log_files: list[TextIO] = []  # kept open for the process's life: faulthandler writes to the descriptor on a crash


def _open_log(path: Path) -> TextIO:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    f = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
    _log_files.append(f)
    return f


def _is_same_file(stream: TextIO, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(stream.fileno()), os.stat(path))
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


def prepare_home(home: NodeHome) -> NodeConfig:
    """Create the home on first start (with a commented node.toml) and load its validated config."""
    home.ensure()
    if not home.config_file.exists():
        template = PROFILES_DIR.parent / "node.toml"
        atomic_write_text(home.config_file, template.read_text(encoding="utf-8"), mode=0o600)
    try:
        return load_config(home.config_file)
    except ConfigError as exc:
        raise StartupError(f"invalid configuration: {exc}") from None


def build_state(home: NodeHome, cfg: NodeConfig, options: StartOptions) -> NodeState:
    """Load identity, profile and model: everything the node needs before it serves."""
    try:
        settings = effective_settings(cfg, options.profile)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    try:
        identity, created = load_or_create_identity(home.identity_key)
    except IdentityFileError as exc:
        raise StartupError(f"refusing to start: {exc}") from None
    if created:
        log.info("created a new node identity %s in %s", identity.fingerprint, home.identity_key)
    try:
        api_token = load_or_create_token(home.api_token)
    except IdentityFileError as exc:
        raise StartupError(f"refusing to start: {exc}") from None
    try:
        model_id, path = resolve_model(cfg.model)
    except ModelNotFoundError as exc:
        raise StartupError(f"cannot load the model: {exc}", EXIT_FAILED) from None
    verdict = choose_extra_buffers(home, path, settings.extra_buffers)
    try:
        model = BaseModel(model_id, path, extra_buffers=verdict.use, verbose=cfg.node.log_level == "debug")
    except Exception as exc:
        raise StartupError(f"cannot load the model: {exc}", EXIT_FAILED) from None
    engine = InferenceEngine(model.llama, settings)
    log.info(
        "model %s (%s) loaded; profile %s: %d threads, %d slots, context %d",
        model.id,
        model.llama.description,
        settings.profile,
        settings.threads,
        settings.slots,
        settings.n_ctx,
    )
    store = AdapterStore(home.adapters_dir, engine.adapters.dims)
    feedback = FeedbackDB(home.state_db)
    manifest = ManifestFile(home.personalities_file, model.names())
    manifest.personalities()
    if manifest.error:
        raise StartupError(
            f"invalid personality manifest: {manifest.error.removesuffix(' (still serving the previous manifest)')}"
        )
    memory = MemoryService(home.memory_dir, home.models_dir / "embed", cfg.memory) if cfg.memory.enabled else None
    tools = ToolService(home, cfg.tools, memory) if cfg.tools.enabled else None
    p2p, notices, market = _network(home, identity, cfg)
    federations = (
        FederationNode(
            home,
            identity,
            path,
            store,
            p2p,
            notices,
            market.registry,
            market.local,
            cfg.federation.keep_released,
            policy=PrivacyPolicy(**msgspec.structs.asdict(cfg.privacy)),
        )
        if p2p is not None and notices is not None and market is not None
        else None
    )
    return NodeState(
        p2p=p2p,
        notices=notices,
        market=market,
        federations=federations,
        config=cfg,
        settings=settings,
        home=home,
        identity=identity,
        model=model,
        engine=engine,
        adapters=store,
        manifest=manifest,
        feedback=feedback,
        training=TrainingService(home, path, store, feedback),
        memory=memory,
        tools=tools,
        api_token=api_token,
        extra_buffers=verdict,
    )


def choose_extra_buffers(home: NodeHome, model_path: Path, setting: Setting) -> Verdict:
    """Decide llama.cpp's extra buffer types for this model (the probe runs once; its verdict is cached) and log
    why; a fallback is a warning."""
    if setting == "auto" and not home.probe_cache.exists():
        log.info("probing llama.cpp's extra buffer types for %s in child processes (once)", model_path.name)
    try:
        verdict = choose(model_path, setting, home.probe_cache)
    except ProbeError as exc:
        raise StartupError(f"{exc}" if exc.unloadable else f"{exc}; run `mirador doctor`", EXIT_FAILED) from None
    if verdict.fell_back:
        log.warning("%s; serving on the plain CPU path (`mirador doctor` tells more)", verdict.describe())
    else:
        log.info("%s", verdict.describe())
    return verdict


def _network(
    home: NodeHome, identity: Identity, cfg: NodeConfig
) -> tuple[P2PNode | None, NoticeBoard | None, MarketService | None]:
    """The libp2p host (DHT validating registry records), its gossip notices and, with the embedded store, the
    network marketplace."""
    if not cfg.p2p.enabled:
        return None, None, None
    p2p_config = P2PConfig(listen_host=cfg.p2p.listen_host, port=cfg.p2p.port, peers_file=home.run_dir / "peers.json")
    p2p, registry = registry_node(identity, p2p_config, federation_validators())
    notices = NoticeBoard()
    market = (
        MarketService(
            home,
            identity,
            p2p,
            registry,
            notices,
            bulk=cfg.p2p.bulk,
            bulk_port=cfg.p2p.bulk_port,
            upload_limit_mbs=cfg.p2p.upload_limit_mbs,
        )
        if cfg.store.backend == "embedded"
        else None
    )
    return p2p, notices, market


def _hypercorn_config(cfg: NodeConfig) -> HypercornConfig:
    hc = HypercornConfig()
    host = f"[{cfg.api.host}]" if ":" in cfg.api.host else cfg.api.host
    hc.bind = [f"{host}:{cfg.api.port}"]
    hc.graceful_timeout = 2.0
    hc.accesslog = None
    hc.errorlog = logging.getLogger("mirador.http")
    return hc


async def serve_node(state: NodeState, lock: RunLock) -> None:
    """Run the node until SIGINT/SIGTERM, then shut down gracefully."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            failure = await _serve_in(nursery, state, lock, signals)
    if failure is not None:
        raise failure


async def _serve_in(
    nursery: trio.Nursery, state: NodeState, lock: RunLock, signals: AsyncIterator[int]
) -> StartupError | None:
    """Start P2P, engine, training and HTTP in `nursery`; serve until a signal; returns a startup failure."""
    cfg = state.config
    hc = _hypercorn_config(cfg)
    try:
        await _start_p2p(state, nursery)
    except StartupError as exc:
        nursery.cancel_scope.cancel()
        return exc
    await nursery.start(state.engine.run)
    await nursery.start(state.training.run)
    if state.memory is not None:
        nursery.start_soon(_warm_memory, state.memory)
    if state.tools is not None:
        await nursery.start(state.tools.run)
    await _start_agents(state, nursery)
    stop_http = trio.Event()

    async def http(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            app: Any = create_app(state)
            await serve(app, hc, shutdown_trigger=stop_http.wait, task_status=task_status)
        finally:
            nursery.cancel_scope.cancel()

    try:
        await nursery.start(http)
    except (OSError, BaseExceptionGroup) as exc:
        bind_error = _os_error(exc)
        if bind_error is None:
            raise
        nursery.cancel_scope.cancel()
        return StartupError(
            f"cannot listen on {hc.bind[0]}: {bind_error.strerror or bind_error}; "
            "choose another api.port (or set MIRADOR_API_PORT)",
            EXIT_FAILED,
        )
    lock.write_pid_file(cfg.api.host, cfg.api.port)
    log.info("serving the OpenAI-compatible API on http://%s", hc.bind[0])
    async for signum in signals:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        break
    state.shutting_down = True
    nursery.start_soon(_second_signal, signals, nursery.cancel_scope)
    await state.engine.drain(cfg.api.shutdown_grace_s)
    await trio.sleep(0.05)  # let the final SSE events reach their clients
    stop_http.set()
    return None


async def _start_agents(state: NodeState, nursery: trio.Nursery) -> None:
    """The event bus on this loop, the parts that emit built-in events wired to it, then the agents and watcher."""
    bus = state.events
    bus.bind()

    def emit(name: str, data: dict[str, Any]) -> None:
        bus.emit(name, data)

    state.adapters.notify = state.feedback.notify = emit
    if state.memory is not None:
        state.memory.notify = emit
    if state.federations is not None:
        state.federations.state.notify = emit
    cfg = state.config.agents
    if not cfg.enabled:
        return
    state.agents = AgentService(state.home.agents_dir, cfg, AlertStore(state.home.state_db), bus, node_runtime(state))
    await nursery.start(state.agents.run)
    if cfg.watch:
        folders = [Path(f).expanduser() for f in cfg.watch]
        nursery.start_soon(watch, folders, cfg.watch_interval_s, bus)


async def _warm_memory(memory: MemoryService) -> None:
    """Load the embedding model now (converted from its package the first time) rather than in a chat, when there
    are memories to recall."""
    try:
        if await trio.to_thread.run_sync(memory.backend.namespaces):
            await trio.to_thread.run_sync(lambda: memory.embedder)
    except Exception:
        log.exception("memory: the embedding model could not be loaded; memory answers 503 until it can")


async def _start_p2p(state: NodeState, nursery: trio.Nursery) -> None:
    """Start the libp2p host (Noise only) with its DHT and gossipsub, then dial the bootstrap peers."""
    if state.p2p is None:
        return
    p2p = state.p2p
    try:
        _check_port_free(p2p.config.listen_host, p2p.config.port)
        await nursery.start(p2p.run)
    except (OSError, P2PError, BaseExceptionGroup) as exc:
        reason = _os_error(exc) or exc
        raise StartupError(
            f"cannot start the P2P host on {p2p.config.listen_host}:{p2p.config.port}: {reason}; "
            "choose another p2p.port (or set MIRADOR_P2P_PORT)",
            EXIT_FAILED,
        ) from None
    log.info("libp2p peer %s listening on %s", p2p.peer_id, ", ".join(str(a) for a in p2p.listen_addrs))
    nursery.start_soon(_bootstrap, p2p, list(state.config.p2p.bootstrap))
    if state.notices is not None:
        await state.notices.attach(p2p)
        await nursery.start(state.notices.run)
    if state.market is not None:
        await nursery.start(state.market.run)
    if state.federations is not None:
        await nursery.start(state.federations.service.run)


def _check_port_free(host: str, port: int) -> None:
    """Raise OSError if another process listens on host:port.

    py-libp2p binds with SO_REUSEPORT, so a second node on the same port would start silently and share the
    port's connections with the first; a plain bind (without it) tells.
    """
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, port))


async def _bootstrap(p2p: P2PNode, addrs: list[str]) -> None:
    """Dial each bootstrap peer once; failures are logged, never fatal."""
    for addr in addrs:
        try:
            peer = await p2p.connect(addr)
            log.info("connected to bootstrap peer %s", peer)
        except (P2PError, ValueError) as exc:
            log.warning("bootstrap peer %s: %s", addr, exc)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError inside `exc` (hypercorn wraps bind errors in exception groups), if any."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _os_error(inner)) is not None:
                return found
    return None


async def _second_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        log.warning("second signal: stopping now")
        scope.cancel()
        return


def run_daemon(home: NodeHome, options: StartOptions) -> int:
    """Start the node in the foreground; returns the process exit code."""
    try:
        cfg = prepare_home(home)
        setup_logging(cfg.node.log_level, home.log_file)
        lock = RunLock(home)
        try:
            lock.acquire()
        except AlreadyRunningError as exc:
            raise StartupError(str(exc), EXIT_FAILED) from None
        try:
            state = build_state(home, cfg, options)
            try:
                trio.run(serve_node, state, lock)
            finally:
                state.model.close()
                state.feedback.close()
                if state.memory is not None:
                    state.memory.close()
        finally:
            lock.release()
    except StartupError as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        for f in _log_files:  # foreground: the log file gets it too
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR mirador.daemon: {exc}", file=f)
        return exc.exit_code
    log.info("stopped")
    return EXIT_OK
