"""`node.toml`: a strict, typed schema, validated on load, with `MIRADOR_<SECTION>_<KEY>` environment overrides.

Every error names the file (or variable), the key and the bad value.
"""

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

ProfileName = Literal["battery", "balanced", "performance"]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base of the config sections: strict keys, keyword-only, immutable."""


class NodeSection(_Section, frozen=True):
    """[node]: which energy profile applies and how much the daemon logs."""

    profile: ProfileName = "balanced"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class ApiSection(_Section, frozen=True):
    """[api]: the OpenAI-compatible HTTP API."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8484
    token: str = ""
    queue_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0, le=8)] = 3.0
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 4 * 1024 * 1024
    home_token: bool = True  # state-changing routes require MIRADOR_HOME/api.token (or `token`); the CLI sends it
    data_folders: list[str] = []  # folders (besides MIRADOR_HOME/data) whose files the API may name as training data
    allowed_hosts: list[str] = []  # Host names besides localhost, 127.0.0.1, [::1] and `host` (DNS-rebinding guard)
    allowed_origins: list[
        str
    ] = []  # web origins allowed to call the API from a browser ("*": any; like OLLAMA_ORIGINS)


class ModelSection(_Section, frozen=True):
    """[model]: the base model; an empty path means the embedded SmolLM2-135M-Instruct."""

    path: str = ""
    name: str = ""


class InferenceSection(_Section, frozen=True):
    """[inference]: overrides of the active energy profile's settings (unset keys come from the profile)."""

    threads: Annotated[int, msgspec.Meta(ge=0)] | None = None
    n_ctx: Annotated[int, msgspec.Meta(ge=128)] | None = None
    max_tokens: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    slots: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    adapter_cache_mb: PositiveInt | None = None
    memory_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # llama.cpp's extra buffer types (weight repacking, e.g. AMX): auto = probed once in a child process per model,
    # llama.cpp build and CPU (node.inference.extra_buffers); on/off force them.
    extra_buffers: Literal["auto", "on", "off"] = "auto"


class StoreSection(_Section, frozen=True):
    """[store]: where published and pulled content lives: the embedded block store, or an IPFS daemon's RPC API."""

    backend: Literal["embedded", "ipfs"] = "embedded"
    ipfs_api: str = "/ip4/127.0.0.1/tcp/5001/http"


class P2PSection(_Section, frozen=True):
    """[p2p]: the libp2p host (Noise only): where it listens and which peers it dials at start."""

    enabled: bool = True
    listen_host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 4485
    bootstrap: list[str] = []
    bulk: bool = True  # serve and fetch block bytes over the bulk channel (node.market.bulk) where peers offer it
    bulk_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # its TCP port on listen_host; 0: any free port
    upload_limit_mbs: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 0.0  # cap on blocks served, MB/s; 0: none


class FederationSection(_Section, frozen=True):
    """[federation]: this node's side of federated rounds."""

    keep_released: bool = False  # keep a copy of every update this node released (federations/<id>/released/)


class PrivacySection(_Section, frozen=True):
    """[privacy]: this node's own limits on any federation it trains in (federation.policy.PrivacyPolicy)."""

    max_epsilon_per_dataset: Annotated[float, msgspec.Meta(gt=0, le=1e6)] = 10.0
    max_epsilon_per_round: Annotated[float, msgspec.Meta(gt=0, le=1e6)] = 5.0
    min_noise_multiplier: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 0.5
    max_delta: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 1e-5
    allow_without_dp: bool = True  # `he` federations: the decrypted mean carries no DP guarantee


class MemorySection(_Section, frozen=True):
    """[memory]: what the node remembers and how it recalls (node.memory)."""

    enabled: bool = True
    url: str = ""  # a Qdrant server (qdrant-client) instead of the embedded store under MIRADOR_HOME/memory
    api_key: str = ""  # the Qdrant server's API key, if it needs one
    remember_chats: bool = True  # each namespace can turn it off (`mirador memory config NS --chats off`)
    inject: Annotated[int, msgspec.Meta(ge=0, le=32)] = 4  # memories injected into a chat at most
    min_similarity: Annotated[float, msgspec.Meta(ge=-1, le=1)] = 0.35  # cosine floor of a dense match
    half_life_days: Annotated[float, msgspec.Meta(gt=0)] = 30.0  # a memory unused this long weighs decay_weight less
    decay_weight: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    mmr_lambda: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.7  # 1 = relevance only, lower = more diverse
    route_similarity: Annotated[float, msgspec.Meta(ge=-1, le=1)] = 0.3  # `auto`: a personality this close answers
    threads: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1  # the embedding model's threads


class McpServer(_Section, frozen=True):
    """[[tools.mcp]]: an MCP server whose tools become node-side tools (named `<name>.<tool>` -> `<name>__<tool>`)."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
    command: list[str] = []  # started by the node, spoken to over stdio
    url: str = ""  # or a running server's streamable HTTP endpoint
    env: dict[str, str] = {}
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0


class ToolsSection(_Section, frozen=True):
    """[tools]: node-side tools (node.tools): the sandbox's limits, user tools, MCP servers."""

    enabled: bool = True
    bwrap: str = "bwrap"  # bubblewrap; without it run_python and calculate are refused, never run unsandboxed
    cpu_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 10
    wall_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 20.0
    memory_mb: Annotated[int, msgspec.Meta(ge=64, le=65536)] = 1024
    user_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0  # a @mirador.tool without its own
    mcp: list[McpServer] = []


class AgentsSection(_Section, frozen=True):
    """[agents]: the user's agents (node.agents): their time limit, back-off, and the folders watched for changes."""

    enabled: bool = True
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0
    max_backoff_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0  # an agent that keeps failing waits up to this
    watch: list[str] = []  # folders whose changes are `file.changed` events
    watch_interval_s: Annotated[float, msgspec.Meta(ge=0.2, le=3600)] = 5.0


class NodeConfig(_Section, frozen=True):
    """The whole validated `node.toml`."""

    node: NodeSection = NodeSection()
    api: ApiSection = ApiSection()
    model: ModelSection = ModelSection()
    federation: FederationSection = FederationSection()
    privacy: PrivacySection = PrivacySection()
    inference: InferenceSection = InferenceSection()
    store: StoreSection = StoreSection()
    memory: MemorySection = MemorySection()
    tools: ToolsSection = ToolsSection()
    agents: AgentsSection = AgentsSection()
    p2p: P2PSection = P2PSection()


class ConfigError(Exception):
    """A configuration value is wrong; the message names where it came from, the key and the value."""


ENV_PREFIX = "MIRADOR_"
_SECTIONS: dict[str, type[_Section]] = {f: t for f, t in NodeConfig.__annotations__.items()}
_PATH_RE = re.compile(r"at `\$\.([\w.\[\]]+)`")


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _convert(data: dict[str, Any], source: str) -> NodeConfig:
    try:
        return msgspec.convert(data, NodeConfig)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = _PATH_RE.search(msg)
        if m is None and msg.startswith("Object contains unknown field"):
            field = msg.split("`")[1]
            raise ConfigError(f"{source}: unknown section or key {field!r} (valid: {_valid_keys(field)})") from None
        if m is None:
            raise ConfigError(f"{source}: {msg}") from None
        key = m.group(1)
        reason = msg[: m.start()].rstrip(" -")
        unknown = re.match(r"Object contains unknown field `([^`]+)`", reason)
        if unknown:
            key = f"{key}.{unknown.group(1)}"
            raise ConfigError(f"{source}: unknown key {key!r} (valid keys: {_valid_keys(key)})") from None
        value = _lookup(data, key)
        raise ConfigError(f"{source}: {key} = {value!r} is invalid: {reason}") from None


def _valid_keys(dotted: str) -> str:
    section = dotted.split(".")[0]
    if "." in dotted and section in _SECTIONS:
        return ", ".join(f"{section}.{f}" for f in _SECTIONS[section].__struct_fields__)
    return ", ".join(f"[{s}]" for s in _SECTIONS)


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Collect `MIRADOR_<SECTION>_<KEY>` variables as raw strings, by section and key."""
    found: dict[str, dict[str, str]] = {}
    for section, struct in _SECTIONS.items():
        for key in struct.__struct_fields__:
            var = f"{ENV_PREFIX}{section}_{key}".upper()
            if var in environ:
                found.setdefault(section, {})[key] = environ[var]
    # MIRADOR_PROFILE is the documented short form of MIRADOR_NODE_PROFILE.
    if "MIRADOR_PROFILE" in environ:
        found.setdefault("node", {})["profile"] = environ["MIRADOR_PROFILE"]
    return found


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for section, values in env_overrides(environ).items():
        struct = _SECTIONS[section]
        target = dict(data.get(section) or {})
        for key, raw in values.items():
            field_type = struct.__annotations__[key]
            var = f"{ENV_PREFIX}{section}_{key}".upper()
            value: Any = [part.strip() for part in raw.split(",") if part.strip()] if field_type == list[str] else raw
            try:
                target[key] = msgspec.convert(value, field_type, strict=False)
            except msgspec.ValidationError as exc:
                raise ConfigError(f"environment: {var}={raw!r} is invalid for {section}.{key}: {exc}") from None
        data[section] = target
    return data


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_semantics(cfg: NodeConfig, source: str) -> NodeConfig:
    if not is_loopback(cfg.api.host) and not cfg.api.token:
        raise ConfigError(
            f"{source}: api.host = {cfg.api.host!r} is not a loopback address, so api.token must be set "
            "(clients then send 'Authorization: Bearer <token>')"
        )
    if cfg.model.path and not Path(cfg.model.path).expanduser().is_file():
        raise ConfigError(f"{source}: model.path = {cfg.model.path!r} is not a file")
    seen: set[str] = set()
    for server in cfg.tools.mcp:
        if bool(server.command) == bool(server.url):
            raise ConfigError(f"{source}: tools.mcp {server.name!r}: give exactly one of command or url")
        if server.name in seen:
            raise ConfigError(f"{source}: tools.mcp: two servers are called {server.name!r}")
        seen.add(server.name)
    return cfg


def parse_config(text: str, source: str, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Parse and validate TOML text, then apply environment overrides from `environ`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    _convert(data, source)  # report file errors as file errors, before env values are mixed in
    data = _apply_env(data, os.environ if environ is None else environ)
    return _check_semantics(_convert(data, f"{source} (with MIRADOR_* overrides)"), source)


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Load `path` (missing file = all defaults) and apply `MIRADOR_*` overrides."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return parse_config(text, str(path), environ)
