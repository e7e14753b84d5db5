"""The node's federations in SQLite (`state.db`, tables `fed_*`) and their HE secrets as files under the home.

- `fed_federations`: every federation this node created or joined, with its signed descriptor, when it joined and
  left, and the last global model it applied (round and CID). The descriptor is verified again on every read
  (`verify_descriptor`), and its id, name and creator must match the row: bytes in the database are never trusted
  blindly.
- `fed_members`: the admitted members of each federation (Ed25519 and X25519 keys) with the signed join request
  that admitted them, as evidence.
- `fed_rounds`: the rounds seen, their aggregator and how they ended.
- `fed_rejections`: a log of refused updates, capped to the newest `KEEP_REJECTIONS` rows.

HE keys live outside the database, one folder per federation: `<secrets_dir>/<federation id>/he_secret.bin` (0600,
the folder 0700) and `he_public.bin` (0644), each written atomically. `FederationStore.for_home(home)` uses
`home.state_db` and `home.root / "federations"`.

One connection per store (WAL, synchronous=FULL, busy timeout), shared by threads under a lock; callers keep it
off event loops. The database file is created 0600 (tightened if group/world accessible).
"""

import json
import logging
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, cast, get_args

import msgspec

from crypto.files import private_file
from crypto.refusal import SingleReason
from crypto.signed import key_fingerprint, signature_valid
from federation.descriptor import (
    MAX_JOIN_BYTES,
    DescriptorError,
    FederationDescriptor,
    JoinRequest,
    Member,
    verify_descriptor,
)
from node.core.fsutil import atomic_write_bytes
from node.core.home import NodeHome
from node.core.notify import Notify, ignore

Role = Literal["creator", "member", "aggregator"]
RoundStatus = Literal["open", "aggregated", "applied", "abandoned", "refused"]
ROLES: tuple[str, ...] = get_args(Role)
ROUND_STATUSES: tuple[str, ...] = get_args(RoundStatus)
# The statuses a round may move to from each status; 'applied', 'abandoned' and 'refused' are final.
NEXT_STATUS: dict[str, frozenset[str]] = {
    "open": frozenset({"aggregated", "applied", "abandoned", "refused"}),
    "aggregated": frozenset({"applied", "abandoned", "refused"}),
}
KEEP_REJECTIONS = 10_000
MAX_DETAIL_CHARS = 1000
MAX_ROUND = 1 << 31
HE_SECRET_FILE = "he_secret.bin"
HE_PUBLIC_FILE = "he_public.bin"
_ID_RE = re.compile(r"^[0-9a-f]{64}$")
_BUSY_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS fed_federations (
    id TEXT PRIMARY KEY CHECK (length(id) = 64),
    name TEXT NOT NULL,
    creator TEXT NOT NULL,
    descriptor BLOB NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('creator', 'member', 'aggregator')),
    joined_at REAL NOT NULL,
    left_at REAL,
    global_round INTEGER NOT NULL DEFAULT 0 CHECK (global_round >= 0),
    global_cid TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX IF NOT EXISTS fed_federations_name ON fed_federations (name);
CREATE TABLE IF NOT EXISTS fed_members (
    federation TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    key_b64 TEXT NOT NULL,
    x25519_b64 TEXT NOT NULL,
    join_request BLOB NOT NULL,
    joined_at REAL NOT NULL,
    admission BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (federation, fingerprint)
) STRICT;
CREATE TABLE IF NOT EXISTS fed_rounds (
    federation TEXT NOT NULL,
    round INTEGER NOT NULL CHECK (round >= 1),
    aggregator TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'aggregated', 'applied', 'abandoned', 'refused')),
    global_cid TEXT NOT NULL DEFAULT '',
    aggregate_cid TEXT NOT NULL DEFAULT '',
    contributors TEXT NOT NULL DEFAULT '[]',
    reason TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    finished REAL,
    PRIMARY KEY (federation, round)
) STRICT;
CREATE TABLE IF NOT EXISTS fed_rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    federation TEXT NOT NULL,
    round INTEGER NOT NULL,
    member TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL CHECK (length(detail) <= {MAX_DETAIL_CHARS}),
    time REAL NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS fed_rejections_federation ON fed_rejections (federation, id);
"""


class FederationStoreError(SingleReason):
    """A federation store operation refused (often on a peer's input: a bad id, a conflicting member)."""

    REASON = "store_refused"


class UnknownFederationError(FederationStoreError, LookupError):
    """No federation with that id is stored."""

    REASON = "unknown_federation"


class StoredDescriptorError(FederationStoreError):
    """A stored descriptor no longer verifies or does not match its row (tampered with or corrupted)."""

    REASON = "stored_descriptor_invalid"


class MemberConflictError(FederationStoreError):
    """A member already stored with other keys, or a join request that does not match the member."""

    REASON = "member_conflict"


class RoundStateError(FederationStoreError):
    """A round or global-model change that the stored state does not allow."""

    REASON = "round_state"


@dataclass(frozen=True)
class FederationRow:
    """A federation of this node: its verified descriptor and this node's state in it."""

    id: str
    descriptor: FederationDescriptor
    descriptor_bytes: bytes
    role: Role
    joined_at: float
    left_at: float | None
    global_round: int
    global_cid: str

    @property
    def name(self) -> str:
        """The federation's name."""
        return self.descriptor.name

    @property
    def creator(self) -> str:
        """The creator's fingerprint."""
        return self.descriptor.creator

    @property
    def active(self) -> bool:
        """True until this node leaves the federation."""
        return self.left_at is None


@dataclass(frozen=True)
class MemberRow:
    """An admitted member with its keys and the signed join request that admitted it."""

    federation: str
    fingerprint: str
    key_b64: str
    x25519_b64: str
    join_request: bytes
    joined_at: float
    admission: bytes = b""  # the creator's AdmissionRecord (empty for members stored before it was signed)


@dataclass(frozen=True)
class RoundRow:
    """One round of a federation as this node saw it."""

    federation: str
    round: int
    aggregator: str
    status: RoundStatus
    global_cid: str
    aggregate_cid: str
    contributors: tuple[str, ...]
    reason: str
    started: float
    finished: float | None


@dataclass(frozen=True)
class RejectionRow:
    """One refused update."""

    id: int
    federation: str
    round: int
    member: str
    reason: str
    detail: str
    time: float


def _check_id(federation: str) -> None:
    """Refuse anything but a federation id (64 lowercase hex digits): ids also name folders."""
    if not isinstance(federation, str) or not _ID_RE.match(federation):
        raise FederationStoreError(f"a federation id is 64 lowercase hex digits, got {str(federation)[:80]!r}")


def _check_round(round: int) -> None:
    """Refuse a round that is not an integer in [1, 2**31]."""
    if isinstance(round, bool) or not isinstance(round, int) or not 1 <= round <= MAX_ROUND:
        raise FederationStoreError(f"a round is an integer in [1, {MAX_ROUND}], got {round!r}")


class FederationStore:
    """This node's federations, members, rounds and refused updates (SQLite), and their HE key files."""

    def __init__(self, db_path: Path, secrets_dir: Path) -> None:
        self.path = Path(db_path)
        self.secrets_dir = Path(secrets_dir)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_file(self.path)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(fed_members)")}
        if "admission" not in columns:  # a store made before admissions were signed (issue 14)
            self._conn.execute("ALTER TABLE fed_members ADD COLUMN admission BLOB NOT NULL DEFAULT x''")
        self._lock = threading.Lock()
        self.notify: Notify = ignore  # the daemon's event bus: `federation.round_applied`

    @contextmanager
    def _write(self) -> Iterator[None]:
        """Hold the lock and one write transaction (BEGIN IMMEDIATE): committed on success, rolled back on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @classmethod
    def for_home(cls, home: NodeHome) -> "FederationStore":
        """The store of a node home: `state.db`, secrets under `<home>/federations/`."""
        return cls(home.state_db, home.root / "federations")

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def __enter__(self) -> "FederationStore":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # federations ----------------------------------------------------------------------------------------------------
    def add_federation(self, descriptor_bytes: bytes, role: Role, now: float | None = None) -> FederationRow:
        """Store a federation after verifying its descriptor; rejoining one that was left makes it active again.

        Adding an active federation again is a no-op; a different role for a stored federation is refused.
        Raises DescriptorError (the descriptor does not verify) or FederationStoreError.
        """
        if role not in ROLES:
            raise FederationStoreError(f"role must be one of {ROLES}, got {role!r}")
        descriptor = verify_descriptor(bytes(descriptor_bytes))
        fid = descriptor.federation_id
        with self._write():
            row = self._conn.execute("SELECT role, left_at FROM fed_federations WHERE id = ?", (fid,)).fetchone()
            if row is None:
                self._conn.execute(
                    "INSERT INTO fed_federations (id, name, creator, descriptor, role, joined_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (fid, descriptor.name, descriptor.creator, bytes(descriptor_bytes), role, _now(now)),
                )
            elif row[0] != role:
                raise FederationStoreError(f"federation {fid[:16]}… is stored with role {row[0]!r}, not {role!r}")
            elif row[1] is not None:
                self._conn.execute(
                    "UPDATE fed_federations SET left_at = NULL, joined_at = ? WHERE id = ?", (_now(now), fid)
                )
        return self._require(fid)

    def federation(self, federation: str) -> FederationRow | None:
        """The federation with that id (active or left), None if unknown; StoredDescriptorError if tampered with."""
        _check_id(federation)
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_FED_COLUMNS} FROM fed_federations WHERE id = ?", (federation,)
            ).fetchone()
        return None if row is None else _federation_row(row)

    def federations(self, active_only: bool = True) -> list[FederationRow]:
        """The stored federations, oldest joined first (rows whose descriptor fails to verify are logged, left out)."""
        where = " WHERE left_at IS NULL" if active_only else ""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_FED_COLUMNS} FROM fed_federations{where} ORDER BY joined_at"
            ).fetchall()
        return _verified_rows(rows)

    def by_name(self, name: str, active_only: bool = True) -> list[FederationRow]:
        """The stored federations called `name` (several creators may use one name), oldest joined first."""
        where = " AND left_at IS NULL" if active_only else ""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_FED_COLUMNS} FROM fed_federations WHERE name = ?{where} ORDER BY joined_at", (name,)
            ).fetchall()
        return _verified_rows(rows)

    def leave(self, federation: str, now: float | None = None) -> bool:
        """Mark the federation left (its rows are kept); False if it is unknown or was already left."""
        _check_id(federation)
        with self._lock:
            cursor = self._conn.execute(
                "UPDATE fed_federations SET left_at = ? WHERE id = ? AND left_at IS NULL", (_now(now), federation)
            )
        return cursor.rowcount > 0

    def set_global(self, federation: str, round: int, cid: str) -> None:
        """Record the global model applied after `round`; an older round, or another CID for it, is refused."""
        _check_id(federation)
        _check_round(round)
        if not isinstance(cid, str) or not 0 < len(cid) <= 128:
            raise FederationStoreError(f"cid must be a non-empty string of at most 128 characters, got {cid!r}")
        with self._write():
            row = self._conn.execute(
                "SELECT global_round, global_cid FROM fed_federations WHERE id = ?", (federation,)
            ).fetchone()
            if row is None:
                raise UnknownFederationError(f"no federation {federation[:16]}… is stored")
            current, current_cid = int(row[0]), str(row[1])
            if round < current or (round == current and cid != current_cid):
                raise RoundStateError(
                    f"federation {federation[:16]}… already applied round {current} ({current_cid}); "
                    f"refusing round {round} ({cid})"
                )
            self._conn.execute(
                "UPDATE fed_federations SET global_round = ?, global_cid = ? WHERE id = ?", (round, cid, federation)
            )
        self.notify("federation.round_applied", {"federation": federation, "round": round, "cid": cid})

    # members --------------------------------------------------------------------------------------------------------
    def add_member(
        self,
        federation: str,
        member: Member,
        join_request: bytes,
        admission: bytes = b"",
        now: float | None = None,
    ) -> bool:
        """Store an admitted member (from `verify_admission`) with its signed join request and the creator's
        admission of it; False if already stored.

        The join request must be the member's own, signed, for this federation. The same member again is a no-op;
        another Ed25519 or X25519 key for a stored fingerprint raises MemberConflictError.
        """
        _check_id(federation)
        request = _matching_join(federation, member, bytes(join_request))
        with self._write():
            if self._conn.execute("SELECT 1 FROM fed_federations WHERE id = ?", (federation,)).fetchone() is None:
                raise UnknownFederationError(f"no federation {federation[:16]}… is stored")
            row = self._conn.execute(
                "SELECT key_b64, x25519_b64 FROM fed_members WHERE federation = ? AND fingerprint = ?",
                (federation, member.fingerprint),
            ).fetchone()
            if row is not None:
                if (row[0], row[1]) != (member.key, member.x25519):
                    raise MemberConflictError(
                        f"member {member.fingerprint} of {federation[:16]}… is stored with other keys; refused"
                    )
                return False
            self._conn.execute(
                "INSERT INTO fed_members (federation, fingerprint, key_b64, x25519_b64, join_request, joined_at, "
                "admission) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (federation, member.fingerprint, member.key, member.x25519, request, _now(now), bytes(admission)),
            )
        return True

    def members(self, federation: str) -> dict[str, str]:
        """The members of the federation: {fingerprint: Ed25519 public key base64}."""
        return {row.fingerprint: row.key_b64 for row in self.member_rows(federation)}

    def member_rows(self, federation: str) -> list[MemberRow]:
        """The members of the federation with their X25519 keys and join requests, by fingerprint."""
        _check_id(federation)
        with self._lock:
            rows = self._conn.execute(
                "SELECT federation, fingerprint, key_b64, x25519_b64, join_request, joined_at, admission "
                "FROM fed_members WHERE federation = ? ORDER BY fingerprint",
                (federation,),
            ).fetchall()
        return [MemberRow(r[0], r[1], r[2], r[3], bytes(r[4]), float(r[5]), bytes(r[6])) for r in rows]

    # rounds ---------------------------------------------------------------------------------------------------------
    def open_round(
        self, federation: str, round: int, aggregator: str, global_cid: str = "", now: float | None = None
    ) -> RoundRow:
        """Record an open round; the same round again with the same aggregator and CID returns the stored row.

        A known round with another aggregator or starting CID raises RoundStateError.
        """
        _check_id(federation)
        _check_round(round)
        with self._write():
            existing = self._round(federation, round)
            if existing is None:
                self._insert_round(federation, round, aggregator, global_cid, now)
            elif (existing.aggregator, existing.global_cid) != (aggregator, global_cid):
                raise RoundStateError(
                    f"round {round} of {federation[:16]}… is already recorded ({existing.status}) with aggregator "
                    f"{existing.aggregator or '?'} from {existing.global_cid or 'the base'}"
                )
            row = self._round(federation, round)
        assert row is not None
        return row

    def finish_round(
        self,
        federation: str,
        round: int,
        status: RoundStatus,
        *,
        aggregate_cid: str = "",
        contributors: Sequence[str] | None = None,
        reason: str = "",
        aggregator: str = "",
        now: float | None = None,
    ) -> RoundRow:
        """Move a round to `status` (see NEXT_STATUS); empty/None arguments keep the stored values.

        A round this node never opened (a member may learn of a round only as it ends) is recorded directly with
        `status` and `aggregator`. Unknown federation: UnknownFederationError; a step NEXT_STATUS forbids:
        RoundStateError.
        """
        _check_id(federation)
        _check_round(round)
        if status not in ROUND_STATUSES or status == "open":
            raise FederationStoreError(f"status must be one of {ROUND_STATUSES[1:]}, got {status!r}")
        listed = None if contributors is None else json.dumps([str(c) for c in contributors])
        with self._write():
            existing = self._round(federation, round)
            if existing is None:
                existing = self._insert_round(federation, round, aggregator, "", now)
            if status not in NEXT_STATUS.get(existing.status, frozenset()):
                raise RoundStateError(
                    f"round {round} of {federation[:16]}… is {existing.status!r}; it cannot become {status!r}"
                )
            self._conn.execute(
                "UPDATE fed_rounds SET status = ?, aggregate_cid = ?, contributors = COALESCE(?, contributors), "
                "reason = ?, finished = ? WHERE federation = ? AND round = ?",
                (
                    status,
                    aggregate_cid or existing.aggregate_cid,
                    listed,
                    reason or existing.reason,
                    _now(now),
                    federation,
                    round,
                ),
            )
            row = self._round(federation, round)
        assert row is not None
        return row

    def rounds(self, federation: str, limit: int = 100) -> list[RoundRow]:
        """The federation's newest `limit` rounds, newest first."""
        _check_id(federation)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_ROUND_COLUMNS} FROM fed_rounds WHERE federation = ? ORDER BY round DESC LIMIT ?",
                (federation, limit),
            ).fetchall()
        return [_round_row(r) for r in rows]

    def last_round(self, federation: str) -> RoundRow | None:
        """The federation's highest recorded round, None if none."""
        rows = self.rounds(federation, 1)
        return rows[0] if rows else None

    def _insert_round(
        self, federation: str, round: int, aggregator: str, global_cid: str, now: float | None
    ) -> RoundRow:
        """Insert an open round of a stored federation (call inside a write); UnknownFederationError if unknown."""
        if self._conn.execute("SELECT 1 FROM fed_federations WHERE id = ?", (federation,)).fetchone() is None:
            raise UnknownFederationError(f"no federation {federation[:16]}… is stored")
        self._conn.execute(
            "INSERT INTO fed_rounds (federation, round, aggregator, status, global_cid, started) "
            "VALUES (?, ?, ?, 'open', ?, ?)",
            (federation, round, aggregator, global_cid, _now(now)),
        )
        row = self._round(federation, round)
        assert row is not None
        return row

    def _round(self, federation: str, round: int) -> RoundRow | None:
        """One round's row (call with the lock held)."""
        row = self._conn.execute(
            f"SELECT {_ROUND_COLUMNS} FROM fed_rounds WHERE federation = ? AND round = ?", (federation, round)
        ).fetchone()
        return None if row is None else _round_row(row)

    # rejections -----------------------------------------------------------------------------------------------------
    def reject(
        self, federation: str, round: int, member: str, reason: str, detail: str = "", now: float | None = None
    ) -> None:
        """Log a refused update (detail cut to MAX_DETAIL_CHARS); only the newest KEEP_REJECTIONS rows are kept."""
        _check_id(federation)
        _check_round(round)
        with self._write():
            cursor = self._conn.execute(
                "INSERT INTO fed_rejections (federation, round, member, reason, detail, time) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (federation, round, str(member)[:256], str(reason)[:64], str(detail)[:MAX_DETAIL_CHARS], _now(now)),
            )
            self._conn.execute("DELETE FROM fed_rejections WHERE id <= ?", ((cursor.lastrowid or 0) - KEEP_REJECTIONS,))

    def rejections(self, federation: str, limit: int = 100) -> list[RejectionRow]:
        """The federation's newest `limit` refused updates, oldest first."""
        _check_id(federation)
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, federation, round, member, reason, detail, time FROM fed_rejections "
                "WHERE federation = ? ORDER BY id DESC LIMIT ?",
                (federation, limit),
            ).fetchall()
        return [RejectionRow(int(r[0]), r[1], int(r[2]), r[3], r[4], r[5], float(r[6])) for r in reversed(rows)]

    # HE keys --------------------------------------------------------------------------------------------------------
    def federation_dir(self, federation: str) -> Path:
        """The federation's key folder (`<secrets_dir>/<id>`), created 0700 (tightened if it was looser)."""
        _check_id(federation)
        folder = self.secrets_dir / federation
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        for path in (self.secrets_dir, folder):
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                path.chmod(0o700)
        return folder

    def save_he_secret(self, federation: str, data: bytes) -> Path:
        """Write the federation's CKKS secret context atomically, mode 0600; returns its path."""
        path = self.federation_dir(federation) / HE_SECRET_FILE
        atomic_write_bytes(path, bytes(data), mode=0o600)
        return path

    def he_secret(self, federation: str) -> bytes | None:
        """The federation's CKKS secret context, None if none was saved."""
        return self._read_key(federation, HE_SECRET_FILE)

    def save_he_public(self, federation: str, data: bytes) -> Path:
        """Write the federation's CKKS public context atomically, mode 0644; returns its path."""
        path = self.federation_dir(federation) / HE_PUBLIC_FILE
        atomic_write_bytes(path, bytes(data), mode=0o644)
        return path

    def he_public(self, federation: str) -> bytes | None:
        """The federation's CKKS public context, None if none was saved."""
        return self._read_key(federation, HE_PUBLIC_FILE)

    def _read_key(self, federation: str, name: str) -> bytes | None:
        """The bytes of a key file of the federation, None if it does not exist."""
        _check_id(federation)
        try:
            return (self.secrets_dir / federation / name).read_bytes()
        except FileNotFoundError:
            return None

    def _require(self, federation: str) -> FederationRow:
        """The stored federation or UnknownFederationError."""
        row = self.federation(federation)
        if row is None:
            raise UnknownFederationError(f"no federation {federation[:16]}… is stored")
        return row


_FED_COLUMNS = "id, name, creator, descriptor, role, joined_at, left_at, global_round, global_cid"
_ROUND_COLUMNS = (
    "federation, round, aggregator, status, global_cid, aggregate_cid, contributors, reason, started, finished"
)


def _now(now: float | None) -> float:
    """`now`, or the current unix time."""
    return time.time() if now is None else float(now)


def _federation_row(row: tuple[object, ...]) -> FederationRow:
    """A row of fed_federations, its descriptor verified and matched against the row; StoredDescriptorError if not."""
    fid, name, creator, blob, role, joined_at, left_at, global_round, global_cid = row
    data = bytes(cast(bytes, blob))
    try:
        descriptor = verify_descriptor(data)
    except DescriptorError as exc:
        raise StoredDescriptorError(f"the stored descriptor of federation {str(fid)[:16]}… is refused: {exc}") from None
    if (descriptor.federation_id, descriptor.name, descriptor.creator) != (fid, name, creator):
        raise StoredDescriptorError(f"the stored descriptor of federation {str(fid)[:16]}… does not match its row")
    return FederationRow(
        id=str(fid),
        descriptor=descriptor,
        descriptor_bytes=data,
        role=cast(Role, role),
        joined_at=float(cast(float, joined_at)),
        left_at=None if left_at is None else float(cast(float, left_at)),
        global_round=int(cast(int, global_round)),
        global_cid=str(global_cid),
    )


def _verified_rows(rows: list[tuple[object, ...]]) -> list[FederationRow]:
    """The rows whose descriptors verify; the others are logged and left out."""
    verified = []
    for row in rows:
        try:
            verified.append(_federation_row(row))
        except StoredDescriptorError as exc:
            log.warning("%s", exc)
    return verified


def _round_row(row: tuple[object, ...]) -> RoundRow:
    """A row of fed_rounds."""
    federation, round, aggregator, status, global_cid, aggregate_cid, contributors, reason, started, finished = row
    return RoundRow(
        federation=str(federation),
        round=int(cast(int, round)),
        aggregator=str(aggregator),
        status=cast(RoundStatus, status),
        global_cid=str(global_cid),
        aggregate_cid=str(aggregate_cid),
        contributors=tuple(json.loads(cast(str, contributors))),
        reason=str(reason),
        started=float(cast(float, started)),
        finished=None if finished is None else float(cast(float, finished)),
    )


def _matching_join(federation: str, member: Member, data: bytes) -> bytes:
    """`data` if it is the member's signed join request for `federation` with the member's keys; else refused."""
    if len(data) > MAX_JOIN_BYTES:
        raise MemberConflictError(f"the join request is {len(data)} bytes; the limit is {MAX_JOIN_BYTES}")
    try:
        request = msgspec.json.decode(data, type=JoinRequest)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MemberConflictError(f"not a join request: {exc}") from None
    found = (request.federation_id, request.joiner, request.key, request.x25519)
    if found != (federation, member.fingerprint, member.key, member.x25519):
        raise MemberConflictError(f"the join request of {request.joiner} does not match member {member.fingerprint}")
    if key_fingerprint(request.key) != request.joiner:
        raise MemberConflictError(f"the join request's key is not the key of {request.joiner}")
    if not signature_valid(request.key, request.signature, request):
        raise MemberConflictError(f"the join request of {member.fingerprint} is not signed by its key")
    return data
