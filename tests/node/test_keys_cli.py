"""`mirador keys`: show, encrypted export and import into another home, public export for trust."""

import subprocess
import sys
from pathlib import Path


def keys(home: Path, *args: str, passphrase: str = "") -> subprocess.CompletedProcess[str]:
    env = {"MIRADOR_HOME": str(home), "PATH": "/usr/bin:/bin", "MIRADOR_KEY_PASSPHRASE": passphrase}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "keys", *args], env=env, capture_output=True, text=True, timeout=60
    )


def fingerprint(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout.split()[1]


def test_an_encrypted_backup_restores_the_same_identity(tmp_path: Path) -> None:
    # Arrange
    a, b = tmp_path / "a", tmp_path / "b"
    original = fingerprint(keys(a, "show"))
    backup = tmp_path / "backup.pem"
    # Act
    short = keys(a, "export", str(tmp_path / "weak.pem"), passphrase="hunter2")
    exported = keys(a, "export", str(backup), passphrase="correct horse")
    wrong = keys(b, "import", str(backup), passphrase="wrong")
    imported = keys(b, "import", str(backup), passphrase="correct horse")
    again = keys(b, "import", str(backup), passphrase="correct horse")
    # Assert
    assert short.returncode == 1 and "at least 12 characters" in short.stderr and not (tmp_path / "weak.pem").exists()
    assert exported.returncode == 0
    assert backup.read_bytes().startswith(b"-----BEGIN MIRADOR ENCRYPTED PRIVATE KEY-----")
    assert oct(backup.stat().st_mode & 0o777) == "0o600"
    assert wrong.returncode == 1 and "passphrase" in wrong.stderr
    assert imported.returncode == 0 and fingerprint(keys(b, "show")) == original
    assert again.returncode == 1 and "--force" in again.stderr
    assert oct((b / "identity.key").stat().st_mode & 0o777) == "0o600"
