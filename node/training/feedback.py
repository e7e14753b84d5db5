"""Recent completions and the user's feedback on them, in SQLite (`MIRADOR_HOME/state.db`).

The node keeps the last `KEEP_COMPLETIONS` completions (prompt and answer) so that feedback can name one by its
id; feedback rows keep their own copy of what they refer to, so pruning never orphans them. Everything stays in
the node home (0600); nothing here ever leaves the node.
"""

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.files import private_file
from node.core.notify import Notify, ignore

KEEP_COMPLETIONS = 2000
GOOD_RATING = 4  # ratings are 1-5; 4 and 5 count as well-rated answers worth learning from

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    personality TEXT NOT NULL,
    adapters TEXT NOT NULL,          -- comma-separated name@version, '' for the base
    messages TEXT NOT NULL,          -- JSON list of {role, content}; a text completion is one user message
    answer TEXT NOT NULL,
    namespace TEXT                   -- the memory namespace the chat used, NULL when memory was off
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    completion_id TEXT NOT NULL,
    personality TEXT NOT NULL,
    adapters TEXT NOT NULL,
    messages TEXT NOT NULL,
    answer TEXT NOT NULL,
    rating INTEGER,                  -- 1..5 or NULL
    correction TEXT                  -- the answer the user wanted, or NULL
);
"""


class UnknownCompletionError(LookupError):
    """No recent completion has that id."""


@dataclass(frozen=True)
class FeedbackRow:
    """One piece of feedback with the exchange it refers to."""

    id: int
    completion_id: str
    personality: str
    adapters: tuple[str, ...]
    messages: list[dict[str, str]]
    answer: str
    rating: int | None
    correction: str | None


class FeedbackDB:
    """Thread-safe access to state.db (one connection, one lock; callers run it off the event loop)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        private_file(path)  # state.db: 0600 whoever creates it first (the CLI or the daemon)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(completions)")}
        if "namespace" not in columns:  # a state.db from before memory
            self._conn.execute("ALTER TABLE completions ADD COLUMN namespace TEXT")
        self._lock = threading.Lock()
        self.notify: Notify = ignore  # the daemon's event bus: `feedback.given`

    def record_completion(
        self,
        completion_id: str,
        personality: str,
        adapters: list[str],
        messages: list[dict[str, str]],
        answer: str,
        namespace: str | None = None,
    ) -> None:
        """Remember a finished completion (the oldest beyond KEEP_COMPLETIONS are dropped)."""
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO completions (id, created, personality, adapters, messages, answer, namespace) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (completion_id, time.time(), personality, ",".join(adapters), json.dumps(messages), answer, namespace),
            )
            self._conn.execute(
                "DELETE FROM completions WHERE id NOT IN (SELECT id FROM completions ORDER BY created DESC LIMIT ?)",
                (KEEP_COMPLETIONS,),
            )

    def add_feedback(self, completion_id: str, rating: int | None, correction: str | None) -> int:
        """Store feedback on a recent completion; returns the feedback id."""
        with self._lock, self._conn:
            row = self._conn.execute(
                "SELECT personality, adapters, messages, answer FROM completions WHERE id = ?", (completion_id,)
            ).fetchone()
            if row is None:
                raise UnknownCompletionError(
                    f"no recent completion has id {completion_id!r} (the node keeps the last {KEEP_COMPLETIONS})"
                )
            cur = self._conn.execute(
                "INSERT INTO feedback (created, completion_id, personality, adapters, messages, answer, rating, "
                "correction) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), completion_id, *row, rating, correction),
            )
        feedback_id = int(cur.lastrowid or 0)
        has_correction = correction is not None
        data = {"id": feedback_id, "completion_id": completion_id, "rating": rating, "correction": has_correction}
        self.notify("feedback.given", data)
        return feedback_id

    def completion_memory(self, completion_id: str) -> tuple[str | None, str]:
        """The memory namespace a recent completion used (None: memory off) and its latest user message."""
        with self._lock:
            row = self._conn.execute(
                "SELECT namespace, messages FROM completions WHERE id = ?", (completion_id,)
            ).fetchone()
        if row is None:
            return None, ""
        messages = json.loads(row[1])
        return row[0], next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")

    def ratings(self) -> dict[str, int]:
        """The latest rating of every rated completion, by completion id."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT completion_id, rating FROM feedback WHERE rating IS NOT NULL ORDER BY id"
            ).fetchall()
        return {str(c): int(r) for c, r in rows}

    def feedback(self) -> list[FeedbackRow]:
        """All feedback, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, completion_id, personality, adapters, messages, answer, rating, correction "
                "FROM feedback ORDER BY id"
            ).fetchall()
        return [
            FeedbackRow(r[0], r[1], r[2], tuple(a for a in r[3].split(",") if a), json.loads(r[4]), r[5], r[6], r[7])
            for r in rows
        ]

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def training_records(rows: list[FeedbackRow], adapter: str) -> list[dict[str, Any]]:
    """Chat records to train `adapter` on: corrections, and well-rated answers, from exchanges it took part in
    or that the base answered alone.

    A correction replaces the answer; a well-rated answer (rating >= GOOD_RATING) is kept as it was; a poorly
    rated answer without a correction teaches nothing and is skipped.
    """
    records = []
    for row in rows:
        names = {a.partition("@")[0] for a in row.adapters}
        if names and adapter not in names:
            continue
        if row.correction:
            answer = row.correction
        elif row.rating is not None and row.rating >= GOOD_RATING:
            answer = row.answer
        else:
            continue
        records.append({"messages": [*row.messages, {"role": "assistant", "content": answer}]})
    return records
