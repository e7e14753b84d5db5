"""The identity key file: created 0600, reloaded unchanged, refused when others can read it."""

import os
from pathlib import Path

import pytest

from node.core.identity_file import IdentityFileError, load_or_create_identity


def test_created_with_mode_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    first, created = load_or_create_identity(path)
    assert created and path.stat().st_mode & 0o777 == 0o600
    again, created_again = load_or_create_identity(path)
    assert not created_again and again.fingerprint == first.fingerprint


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.key"
    load_or_create_identity(path)
    os.chmod(path, mode)
    with pytest.raises(IdentityFileError, match=f"mode {mode:04o}.*chmod 600"):
        load_or_create_identity(path)


def test_corrupt_key_is_refused_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"garbage")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityFileError, match="unusable"):
        load_or_create_identity(path)
    assert path.read_bytes() == b"garbage"
