"""private_file on a database the process already has open: the process keeps its SQLite locks, so it keeps seeing
what other processes commit (and they never delete the WAL under it)."""

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from crypto.files import private_file


def writer(db: Path, statement: str, stay_open: bool) -> "subprocess.Popen[str]":
    """Another process that commits `statement` in WAL mode, then exits or keeps its connection open."""
    source = textwrap.dedent(
        f"""
        import sqlite3, sys
        c = sqlite3.connect({str(db)!r}, isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute({statement!r})
        print("ready", flush=True)
        sys.stdin.readline()
        c.close()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", source], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    if not stay_open:
        proc.communicate("\n")
    return proc


def test_a_process_with_the_database_open_keeps_seeing_other_processes_commits(tmp_path: Path) -> None:
    # Arrange: a long-lived connection (the daemon's), then private_file again (another store made later)
    db = tmp_path / "state.db"
    private_file(db)
    held = sqlite3.connect(db, isolation_level=None)
    held.execute("PRAGMA journal_mode=WAL")
    held.execute("SELECT count(*) FROM sqlite_master").fetchall()
    private_file(db)
    writer(db, "CREATE TABLE seen (x)", stay_open=False)  # a CLI commits and exits: it must not think itself alone
    wal_before = (tmp_path / "state.db-wal").stat().st_ino
    still_open = writer(db, "INSERT INTO seen VALUES (1)", stay_open=True)
    try:
        # Act: a fresh connection in this process
        fresh = sqlite3.connect(db)
        seen = fresh.execute("SELECT x FROM seen").fetchall()
        fresh.close()
        wal_after = (tmp_path / "state.db-wal").stat().st_ino
    finally:
        still_open.communicate("\n")
        held.close()
    # Assert
    assert seen == [(1,)]
    assert wal_after == wal_before  # the WAL this process maps was never deleted and replaced


def test_new_files_are_made_0600_and_loose_ones_tightened(tmp_path: Path) -> None:
    # Arrange
    loose = tmp_path / "loose"
    loose.write_text("x")
    loose.chmod(0o644)
    # Act
    private_file(tmp_path / "new")
    private_file(loose)
    # Assert
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600 and loose.stat().st_mode & 0o777 == 0o600
    assert loose.read_text() == "x"
