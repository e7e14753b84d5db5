"""Files that hold secrets or private data (keys, the state database, the privacy ledger): the owner's only."""

import os
import stat
from pathlib import Path


def private_file(path: Path) -> None:
    """Create `path` with mode 0600 if missing; remove group/other permissions if present."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
