"""Files that hold secrets or private data (keys, the state database, the privacy ledger): the owner's only."""

import contextlib
import os
import stat
from pathlib import Path


def private_file(path: Path) -> None:
    """Create `path` with mode 0600 if missing; remove group/other permissions if present.

    An existing file is never opened: closing any descriptor of a file drops every POSIX lock the process holds on
    it, and SQLite's locks are POSIX locks. A daemon with state.db open that made one more store lost its shared
    lock for good; the next CLI to close state.db then thought itself the last user, checkpointed and deleted the
    -wal and -shm under the daemon's open connections: the daemon stopped seeing other processes' commits and its
    own later commits went into a deleted WAL (tests/crypto/test_files.py)."""
    with contextlib.suppress(FileExistsError):  # a new file: nobody in this process has it open
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
        os.chmod(path, 0o600)
