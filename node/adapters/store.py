"""Installed LoRA adapters: `MIRADOR_HOME/adapters/<name>/<version>/` plus a `current` pointer per name.

Each version folder holds `adapter.gguf` (what llama.cpp serves) and, when the adapter was trained here, peft's
`adapter_model.safetensors` + `adapter_config.json` and `training.json`. Versions are `v1`, `v2`, ... and never
change once written. Installing checks the GGUF first (node.adapters.check), builds the version in a hidden temp
folder, renames it into place and only then moves `current`: a refused or interrupted install leaves the
previous version serving. A running daemon reads `current` per request, so a new version is live at once.
"""

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from node.adapters.check import PICKLE_SUFFIXES, AdapterRejected, BaseDims, check_adapter_file
from node.adapters.personalities import NAME_RE
from node.core.fsutil import atomic_write_text, fsync_dir
from node.core.notify import Notify, ignore

GGUF_FILE = "adapter.gguf"
CURRENT_FILE = "current"
# files a version folder may hold besides the GGUF: peft's safetensors and config, training facts
TRAINING_FILE = "training.json"  # what a training run did and measured, per-step losses included
PROVENANCE_FILE = "provenance.json"  # what the adapter was trained on, when that matters (memory: never published)
EXTRA_FILES = ("adapter_model.safetensors", "adapter_config.json", TRAINING_FILE, PROVENANCE_FILE)
_VERSION = re.compile(r"^v([1-9][0-9]{0,8})$")


class UnknownAdapterError(LookupError):
    """No adapter (or no such version) is installed under that name."""


@dataclass(frozen=True)
class AdapterVersion:
    """One installed adapter version."""

    name: str
    version: str
    folder: Path

    @property
    def gguf(self) -> Path:
        """The GGUF LoRA file llama.cpp loads."""
        return self.folder / GGUF_FILE

    @property
    def key(self) -> str:
        """Identity of this exact version (cache key): `name@version`."""
        return f"{self.name}@{self.version}"

    @property
    def size_bytes(self) -> int:
        """Size of the GGUF file (about what it occupies once loaded: F32 tensors)."""
        return self.gguf.stat().st_size


def _check_name(name: str) -> None:
    if not re.match(NAME_RE, name):
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_', '.', '-' (at most 64, starting alnum)")


class AdapterStore:
    """The adapters folder of one node home, checked against the served base model's dimensions."""

    def __init__(self, root: Path, dims: BaseDims | None) -> None:
        self.root = root
        self.dims = dims
        self.notify: Notify = ignore  # the daemon's event bus: `adapter.installed`

    def names(self) -> list[str]:
        """Names that have a current version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / CURRENT_FILE).is_file())

    def versions(self, name: str) -> list[str]:
        """Installed versions of `name`, oldest first."""
        _check_name(name)
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in folder.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir()]
        return [v for _, v in sorted(found)]

    def current(self, name: str) -> AdapterVersion:
        """The version of `name` that serves now."""
        _check_name(name)
        pointer = self.root / name / CURRENT_FILE
        try:
            version = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise UnknownAdapterError(f"no adapter named {name!r} is installed (see `mirador adapter list`)") from None
        if not _VERSION.match(version) or not (self.root / name / version / GGUF_FILE).is_file():
            raise UnknownAdapterError(f"adapter {name!r}: {pointer} names {version!r}, which is not installed")
        return AdapterVersion(name, version, self.root / name / version)

    def get(self, name: str, version: str) -> AdapterVersion:
        """A specific installed version."""
        if version not in self.versions(name):
            raise UnknownAdapterError(f"adapter {name!r} has no version {version!r}")
        return AdapterVersion(name, version, self.root / name / version)

    def install(self, name: str, gguf: Path, extras: list[Path] | None = None) -> AdapterVersion:
        """Check `gguf` and install it (with the optional peft/training files) as the next version of `name`.

        Raises AdapterRejected (the previous version keeps serving) when the file is not a good adapter for
        this base.
        """
        _check_name(name)
        extras = extras or []
        if self.dims is None:
            raise AdapterRejected("the served model's metadata does not describe its layers; it takes no adapters")
        for path in [gguf, *extras]:
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise AdapterRejected(f"{path.name}: pickle formats are never installed; use GGUF or safetensors")
        for path in extras:
            if path.name not in EXTRA_FILES:
                raise AdapterRejected(f"{path.name}: not an adapter file (allowed: {', '.join(EXTRA_FILES)})")
        dims = self.dims
        check_adapter_file(gguf, dims)
        folder = self.root / name
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".install-"))
        try:
            for src, dst_name in [(gguf, GGUF_FILE), *[(p, p.name) for p in extras]]:
                _copy_synced(src, tmp / dst_name)
            check_adapter_file(tmp / GGUF_FILE, dims)  # the copy is what serves: check it too
            existing = self.versions(name)
            number = int(existing[-1][1:]) + 1 if existing else 1
            version = f"v{number}"
            os.rename(tmp, folder / version)  # fails if a concurrent install took the number: nothing lost
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(folder)
        atomic_write_text(folder / CURRENT_FILE, version + "\n")
        self.notify("adapter.installed", {"name": name, "version": version})
        return AdapterVersion(name, version, folder / version)

    def activate(self, name: str, version: str) -> AdapterVersion:
        """Make an installed version current again (rollback)."""
        chosen = self.get(name, version)
        if self.dims is not None:
            check_adapter_file(chosen.gguf, self.dims)
        atomic_write_text(self.root / name / CURRENT_FILE, version + "\n")
        return chosen

    def remove(self, name: str) -> None:
        """Uninstall every version of `name` (the pointer first, so nothing half-removed is served)."""
        _check_name(name)
        folder = self.root / name
        if not folder.is_dir():
            raise UnknownAdapterError(f"no adapter named {name!r} is installed")
        (folder / CURRENT_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder)


def _copy_synced(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
