"""The node home folder (`MIRADOR_HOME`, default `~/.mirador`): where every piece of node state lives."""

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "MIRADOR_HOME"


@dataclass(frozen=True)
class NodeHome:
    """Paths inside one node home; `ensure()` creates the folders on first start."""

    root: Path

    @classmethod
    def from_env(cls, override: str | os.PathLike[str] | None = None) -> "NodeHome":
        """The home named by `override`, else `$MIRADOR_HOME`, else `~/.mirador`."""
        raw = override or os.environ.get(HOME_ENV) or Path.home() / ".mirador"
        return cls(Path(raw).expanduser().resolve())

    @property
    def identity_key(self) -> Path:
        """Ed25519 private key, PEM, mode 0600."""
        return self.root / "identity.key"

    @property
    def api_token(self) -> Path:
        """The per-home API token (0600) that state-changing API routes require (node.core.api_token)."""
        return self.root / "api.token"

    @property
    def data_dir(self) -> Path:
        """Training data the API may name (node.core.datafiles); the CLI imports the user's files here."""
        return self.root / "data"

    @property
    def config_file(self) -> Path:
        """The node's `node.toml`."""
        return self.root / "node.toml"

    @property
    def run_dir(self) -> Path:
        """Pid file, lock file and daemon log."""
        return self.root / "run"

    @property
    def pid_file(self) -> Path:
        """Pid and API address of the running daemon (informational; the lock is authoritative)."""
        return self.run_dir / "daemon.pid"

    @property
    def lock_file(self) -> Path:
        """Held (flock) by the running daemon; released by the kernel even on SIGKILL."""
        return self.run_dir / "daemon.lock"

    @property
    def log_file(self) -> Path:
        """Where a detached daemon writes its log."""
        return self.run_dir / "daemon.log"

    @property
    def probe_cache(self) -> Path:
        """Cached verdicts of the extra-buffers probe (node.inference.extra_buffers)."""
        return self.root / "cache" / "extra_buffers.json"

    @property
    def models_dir(self) -> Path:
        """Model files (GGUF) installed into this node."""
        return self.root / "models"

    @property
    def adapters_dir(self) -> Path:
        """LoRA adapters (GGUF + safetensors)."""
        return self.root / "adapters"

    @property
    def memory_dir(self) -> Path:
        """Long-term memory: one embedded Qdrant shard per namespace (node.memory)."""
        return self.root / "memory"

    @property
    def tools_dir(self) -> Path:
        """The user's own tools (`@mirador.tool` in *.py), loaded by the daemon."""
        return self.root / "tools"

    @property
    def agents_dir(self) -> Path:
        """The user's own agents (`@mirador.agent` in *.py), loaded by the daemon."""
        return self.root / "agents"

    @property
    def scratch_dir(self) -> Path:
        """The only folder sandboxed code sees (read-write, mounted at /scratch)."""
        return self.root / "scratch"

    @property
    def personalities_file(self) -> Path:
        """The personality manifest (re-read by a running daemon when it changes)."""
        return self.root / "personalities.toml"

    @property
    def state_db(self) -> Path:
        """SQLite: recent completions and the user's feedback on them."""
        return self.root / "state.db"

    def ensure(self) -> None:
        """Create the home and its folders (mode 0700) if they are missing; tighten them to 0700 if they exist."""
        for folder in (self.root, self.run_dir, self.models_dir, self.adapters_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if folder.stat().st_mode & 0o077 and folder.stat().st_uid == os.getuid():
                folder.chmod(0o700)
