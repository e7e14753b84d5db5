"""Which files the node may read as training data when the API names them: files under MIRADOR_HOME/data and the
folders in `[api] data_folders`, never any other path on the machine (an API caller must not be able to train on,
or probe the existence of, an arbitrary file). The CLI imports the user's files into MIRADOR_HOME/data/imports."""

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from node.core.home import NodeHome

IMPORTS = "imports"


def data_folders(home: NodeHome, extra: Iterable[str]) -> list[Path]:
    """The folders whose files the API accepts as data: MIRADOR_HOME/data first, then the configured ones."""
    return [home.data_dir.resolve(), *(Path(f).expanduser().resolve() for f in extra)]


def inside(path: Path, folders: Iterable[Path]) -> bool:
    """Whether `path` (already resolved, symlinks followed) lies under one of `folders`."""
    return any(path.is_relative_to(folder) for folder in folders)


def import_file(home: NodeHome, source: Path) -> Path:
    """A copy of `source` under MIRADOR_HOME/data/imports named by its content (0600, written atomically; the same
    content is imported once). The node reads the copy, so the user's file may move or change afterwards."""
    digest = hashlib.sha256()
    with source.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    folder = home.data_dir / IMPORTS
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = folder / f"{digest.hexdigest()[:16]}-{source.name}"
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".import-")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
