"""The home is the owner's only, whoever touches it first (issue 14, finding 11): the CLI creating state.db before
any daemon ran, and a home folder made group/world-readable by hand."""

import os
import subprocess
import sys
from pathlib import Path

from node.core.home import NodeHome


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MIRADOR_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(0o022),  # the usual umask: sqlite would create 0644 files
    )


def test_the_cli_creates_state_db_for_its_owner_only(tmp_path: Path) -> None:
    # Arrange
    home = tmp_path / "home"

    # Act
    done = cli(home, "trust", "list")

    # Assert
    assert done.returncode == 0, done.stderr
    assert (home / "state.db").stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700


def test_an_existing_home_is_tightened(tmp_path: Path) -> None:
    # Arrange
    home = NodeHome(tmp_path / "home")
    home.ensure()
    for folder in (home.root, home.run_dir):
        folder.chmod(0o755)
    (home.root / "state.db").touch(mode=0o644)
    (home.root / "state.db").chmod(0o644)

    # Act
    done = cli(home.root, "trust", "list")

    # Assert
    assert done.returncode == 0, done.stderr
    assert home.root.stat().st_mode & 0o777 == 0o700 and home.run_dir.stat().st_mode & 0o777 == 0o700
    assert (home.root / "state.db").stat().st_mode & 0o777 == 0o600
