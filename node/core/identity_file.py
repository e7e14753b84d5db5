"""Load or create the node's identity key file, refusing keys that others can read."""

import os
import stat
from pathlib import Path

from crypto.identity import Identity, IdentityFormatError
from node.core.fsutil import atomic_write_bytes


class IdentityFileError(Exception):
    """The identity key file is unsafe or unreadable; the message says how to fix it."""


def check_key_permissions(path: Path) -> None:
    """Raise IdentityFileError if `path` is readable or writable by group or others, or owned by another user."""
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise IdentityFileError(
            f"identity key {path} has mode {mode:04o}: it must be readable by its owner only. "
            f"Fix it with: chmod 600 {path}"
        )
    if st.st_uid != os.getuid():
        raise IdentityFileError(f"identity key {path} is owned by uid {st.st_uid}, not by you ({os.getuid()})")


def load_or_create_identity(path: Path) -> tuple[Identity, bool]:
    """Return (identity, created): load the key at `path`, or generate and store a new one with mode 0600."""
    if not path.exists():
        identity = Identity.generate()
        atomic_write_bytes(path, identity.to_pem(), mode=0o600)
        return identity, True
    check_key_permissions(path)
    try:
        return Identity.from_pem(path.read_bytes()), False
    except IdentityFormatError as exc:
        raise IdentityFileError(f"identity key {path} is unusable: {exc}") from exc
