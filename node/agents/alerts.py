"""Agents' alerts and their on/off switches, in state.db (SQLite, 0600; nothing here leaves the node)."""

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crypto.files import private_file

KEEP_ALERTS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    agent TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    level TEXT NOT NULL,
    event TEXT NOT NULL,             -- the name of the event that woke the agent
    event_data TEXT NOT NULL         -- its data, JSON
);
CREATE TABLE IF NOT EXISTS agent_settings (
    name TEXT PRIMARY KEY,
    enabled INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class AlertRow:
    """A stored alert."""

    id: int
    created: float
    agent: str
    title: str
    body: str
    level: str
    event: str
    event_data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The alert as JSON-ready data."""
        return asdict(self)


class AlertStore:
    """Thread-safe access to the alert tables (one connection, one lock; callers run it off the event loop)."""

    def __init__(self, path: Path) -> None:
        private_file(path)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def add(self, agent: str, title: str, body: str, level: str, event: str, event_data: dict[str, Any]) -> AlertRow:
        """Store an alert (the oldest beyond KEEP_ALERTS are dropped)."""
        created = time.time()
        data = json.dumps(event_data, default=str)
        with self._lock, self._conn:
            cur = self._conn.execute(
                "INSERT INTO alerts (created, agent, title, body, level, event, event_data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (created, agent, title, body, level, event, data),
            )
            self._conn.execute(
                "DELETE FROM alerts WHERE id NOT IN (SELECT id FROM alerts ORDER BY id DESC LIMIT ?)", (KEEP_ALERTS,)
            )
        return AlertRow(int(cur.lastrowid or 0), created, agent, title, body, level, event, event_data)

    def recent(self, limit: int = 50, agent: str | None = None, after_id: int = 0) -> list[AlertRow]:
        """The newest alerts first (of one agent, and newer than `after_id`, when given)."""
        query = "SELECT id, created, agent, title, body, level, event, event_data FROM alerts WHERE id > ?"
        params: list[Any] = [after_id]
        if agent is not None:
            query += " AND agent = ?"
            params.append(agent)
        query += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._conn.execute(query, params).fetchall()
        return [AlertRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7])) for r in rows]

    def enabled(self) -> dict[str, bool]:
        """The switches set so far (an agent not listed is enabled)."""
        with self._lock:
            return {name: bool(on) for name, on in self._conn.execute("SELECT name, enabled FROM agent_settings")}

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Turn an agent on or off (kept across restarts)."""
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO agent_settings (name, enabled) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET enabled = excluded.enabled",
                (name, int(enabled)),
            )

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
