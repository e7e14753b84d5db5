"""The local registry (SQLite): known artifacts, trusted publishers, the highest version seen per name and
publisher (rollback protection), and the append-only audit log of every publish, pull, verify, refusal and trust
change.
"""

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from crypto.files import private_file
from marketplace.semver import SemVer

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mp_artifacts (
    name TEXT NOT NULL, version TEXT NOT NULL, publisher TEXT NOT NULL, kind TEXT NOT NULL,
    envelope_sha256 TEXT NOT NULL, root_cid TEXT NOT NULL, folder TEXT NOT NULL, added REAL NOT NULL,
    PRIMARY KEY (name, version, publisher)
);
CREATE TABLE IF NOT EXISTS mp_trusted (
    fingerprint TEXT PRIMARY KEY, key_b64 TEXT NOT NULL, label TEXT NOT NULL, added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS mp_highest (
    name TEXT NOT NULL, publisher TEXT NOT NULL, version TEXT NOT NULL, PRIMARY KEY (name, publisher)
);
CREATE TABLE IF NOT EXISTS mp_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, action TEXT NOT NULL, artifact TEXT NOT NULL,
    publisher TEXT NOT NULL, result TEXT NOT NULL, detail TEXT NOT NULL
);
"""


class RollbackError(ValueError):
    """A version lower than one already seen from that publisher for that name."""


@dataclass(frozen=True)
class ArtifactRecord:
    """One installed artifact version."""

    name: str
    version: str
    publisher: str
    kind: str
    envelope_sha256: str
    root_cid: str
    folder: str
    added: float


@dataclass(frozen=True)
class TrustedKey:
    """A publisher this node trusts."""

    fingerprint: str
    key_b64: str
    label: str
    added: float


@dataclass(frozen=True)
class AuditEntry:
    """One line of the audit log."""

    id: int
    time: float
    action: str
    artifact: str
    publisher: str
    result: str
    detail: str


class Registry:
    """The marketplace tables of the node's SQLite database (thread-safe; callers keep it off event loops)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        private_file(path)  # state.db: 0600 whoever creates it first (the CLI or the daemon)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    # trust --------------------------------------------------------------------------------------------------------
    def trust(self, fingerprint: str, key_b64: str, label: str = "") -> None:
        """Trust a publisher (idempotent)."""
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO mp_trusted VALUES (?, ?, ?, ?)", (fingerprint, key_b64, label, time.time())
            )
        self.audit("trust-add", "", fingerprint, "ok", label)

    def untrust(self, fingerprint: str) -> bool:
        """Stop trusting a publisher; False if it was not trusted."""
        with self._lock:
            removed = self._conn.execute("DELETE FROM mp_trusted WHERE fingerprint = ?", (fingerprint,)).rowcount
        self.audit("trust-remove", "", fingerprint, "ok" if removed else "not-trusted", "")
        return bool(removed)

    def trusted(self) -> list[TrustedKey]:
        """Trusted publishers, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM mp_trusted ORDER BY added").fetchall()
        return [TrustedKey(*r) for r in rows]

    # versions -----------------------------------------------------------------------------------------------------
    def check_not_rollback(self, name: str, publisher: str, version: str) -> None:
        """Raise RollbackError if `version` is lower than the highest seen from `publisher` for `name`."""
        with self._lock:
            row = self._conn.execute(
                "SELECT version FROM mp_highest WHERE name = ? AND publisher = ?", (name, publisher)
            ).fetchone()
        if row is not None and SemVer.parse(version) < SemVer.parse(row[0]):
            raise RollbackError(
                f"{name}@{version} is older than {name}@{row[0]}, already seen from {publisher} (rollback refused)"
            )

    def saw(self, name: str, publisher: str, version: str) -> None:
        """Record that `version` was seen (and verified) from `publisher`; keeps the highest."""
        with self._lock, self._conn:
            row = self._conn.execute(
                "SELECT version FROM mp_highest WHERE name = ? AND publisher = ?", (name, publisher)
            ).fetchone()
            if row is None or SemVer.parse(row[0]) < SemVer.parse(version):
                self._conn.execute("INSERT OR REPLACE INTO mp_highest VALUES (?, ?, ?)", (name, publisher, version))

    def highest_seen(self, name: str, publisher: str) -> str | None:
        """The highest version seen from `publisher` for `name`, if any."""
        with self._lock:
            row = self._conn.execute(
                "SELECT version FROM mp_highest WHERE name = ? AND publisher = ?", (name, publisher)
            ).fetchone()
        return row[0] if row else None

    # artifacts ----------------------------------------------------------------------------------------------------
    def add(self, record: ArtifactRecord) -> None:
        """Register an installed artifact version (replacing a record of the same name, version, publisher)."""
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO mp_artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.name,
                    record.version,
                    record.publisher,
                    record.kind,
                    record.envelope_sha256,
                    record.root_cid,
                    record.folder,
                    record.added,
                ),
            )

    def remove(self, name: str, version: str, publisher: str) -> None:
        """Forget one installed version (its folder is the caller's to delete)."""
        with self._lock:
            self._conn.execute(
                "DELETE FROM mp_artifacts WHERE name = ? AND version = ? AND publisher = ?", (name, version, publisher)
            )

    def artifacts(self, name: str | None = None) -> list[ArtifactRecord]:
        """Installed artifacts (of one name, or all), highest version first within a name."""
        with self._lock:
            query = "SELECT * FROM mp_artifacts" + (" WHERE name = ?" if name else "")
            rows = self._conn.execute(query, (name,) if name else ()).fetchall()
        records = [ArtifactRecord(*r) for r in rows]
        return sorted(records, key=lambda r: (r.name, SemVer.parse(r.version)), reverse=True)

    def find(self, name: str, version: str | None = None) -> ArtifactRecord | None:
        """The installed `name@version`, or its highest installed version."""
        for record in self.artifacts(name):
            if version is None or record.version == version:
                return record
        return None

    # audit --------------------------------------------------------------------------------------------------------
    def audit(self, action: str, artifact: str, publisher: str, result: str, detail: str = "") -> None:
        """Append one entry to the audit log."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO mp_audit (time, action, artifact, publisher, result, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), action, artifact, publisher, result, detail),
            )

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        """The newest `limit` audit entries, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM mp_audit ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [AuditEntry(*r) for r in reversed(rows)]
