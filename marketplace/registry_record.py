"""Signed registry records for the DHT: name → versions → envelope CID, one record per name and publisher.

DHT key: `/mirador/<hash of name and publisher fingerprint>` (record_key). The value is a JSON record signed with
the publisher's Ed25519 key over its canonical encoding (sorted keys, no signature field). A DHT node stores a
record only if `validate_record` accepts it: schema and size, key consistent with name and publisher, publisher key
matching its fingerprint, a valid signature, not expired, and — against the record it already holds — a higher sequence
number that keeps every version the stored one listed at or above its highest (no rollback).
"""

import hashlib
import time
from dataclasses import dataclass
from typing import Annotated

import msgspec

from crypto.identity import Identity
from crypto.refusal import Refused
from crypto.signed import decode_strict, key_fingerprint, sign_struct, signature_valid
from marketplace.manifest import NAME_RE
from marketplace.semver import SemVer, VersionError

SCHEMA = "mirador.record/v1"
KEY_PREFIX = "/mirador/"
MAX_RECORD_BYTES = 64 * 1024
MAX_VERSIONS = 256
DEFAULT_TTL_S = 7 * 24 * 3600


class RecordRejected(Refused):
    """A registry record refused: reason `invalid_record` (or a StructReason from decoding) and a detail."""

    def __init__(self, detail: str, reason: str = "invalid_record") -> None:
        super().__init__(reason, detail)


class VersionEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One published version and the CID of its signed envelope."""

    version: Annotated[str, msgspec.Meta(max_length=64)]
    envelope_cid: Annotated[str, msgspec.Meta(min_length=2, max_length=128)]


class RegistryRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A signed record: `signature` covers the canonical encoding of every other field."""

    schema: str
    name: Annotated[str, msgspec.Meta(pattern=NAME_RE)]
    publisher: Annotated[str, msgspec.Meta(max_length=80)]
    key: Annotated[str, msgspec.Meta(max_length=64)]
    seq: Annotated[int, msgspec.Meta(ge=0)]
    expires: Annotated[int, msgspec.Meta(ge=0)]
    versions: Annotated[list[VersionEntry], msgspec.Meta(min_length=1, max_length=MAX_VERSIONS)]
    signature: Annotated[str, msgspec.Meta(max_length=128)] = ""

    def highest(self) -> SemVer:
        """The highest version listed."""
        return max(SemVer.parse(v.version) for v in self.versions)


def record_key(name: str, publisher: str) -> str:
    """The DHT key of `name` published by `publisher`: '/mirador/' + 40 hex digits of sha256('<name>/<publisher>').

    Hashed to 49 bytes because py-libp2p 0.8.1 refuses FIND_NODE targets longer than 50 bytes that are not
    multihashes: a longer key would never be walked to its closest peers (the network lookup would silently fall
    back to the local routing table). The record itself names its name and publisher; validation recomputes this.
    """
    digest = hashlib.sha256(f"{name}/{publisher}".encode()).hexdigest()[:40]
    return f"{KEY_PREFIX}{digest}"


def sign_record(identity: Identity, name: str, versions: dict[str, str], seq: int, ttl_s: int = DEFAULT_TTL_S) -> bytes:
    """A signed record (JSON bytes) listing `versions` (version → envelope CID), highest first."""
    entries = sorted(
        (VersionEntry(v, cid) for v, cid in versions.items()), key=lambda e: SemVer.parse(e.version), reverse=True
    )
    unsigned = RegistryRecord(
        schema=SCHEMA,
        name=name,
        publisher=identity.fingerprint,
        key=identity.public_key_b64(),
        seq=seq,
        expires=int(time.time()) + ttl_s,
        versions=entries,
    )
    return msgspec.json.encode(sign_struct(identity, unsigned))


def parse_record(value: bytes) -> RegistryRecord:
    """Decode a record (size and schema only; `validate_record` does the rest)."""
    record = decode_strict(value, RegistryRecord, MAX_RECORD_BYTES, SCHEMA, lambda r, d: RecordRejected(d, r))
    try:
        for entry in record.versions:
            SemVer.parse(entry.version)
    except VersionError as exc:
        raise RecordRejected(f"versions: {exc}") from None
    if len({e.version for e in record.versions}) != len(record.versions):
        raise RecordRejected("versions: a version is listed twice")
    return record


@dataclass(frozen=True)
class ValidRecord:
    """A record that passed validation."""

    record: RegistryRecord
    raw: bytes


def validate_record(key: str, value: bytes, stored: bytes | None = None, now: float | None = None) -> ValidRecord:
    """Accept `value` for DHT `key` (replacing `stored`, if any) or raise RecordRejected with the reason."""
    record = parse_record(value)
    if key != record_key(record.name, record.publisher):
        raise RecordRejected(f"key {key!r} does not name this record ({record_key(record.name, record.publisher)})")
    if not record.signature:
        raise RecordRejected("unsigned record")
    fingerprint = key_fingerprint(record.key)
    if fingerprint is None:
        raise RecordRejected("malformed key: not a base64 Ed25519 public key")
    if fingerprint != record.publisher:
        raise RecordRejected(f"the record's key is {fingerprint}, not the publisher {record.publisher}")
    if not signature_valid(record.key, record.signature, record):
        raise RecordRejected("bad signature")
    if record.expires < (time.time() if now is None else now):
        raise RecordRejected("expired record")
    if stored is not None:
        old = parse_record(stored)
        if record.seq <= old.seq:
            raise RecordRejected(f"sequence {record.seq} is not newer than the stored {old.seq} (replay refused)")
        if record.highest() < old.highest():
            raise RecordRejected(
                f"highest version {record.highest()} is lower than the stored {old.highest()} (rollback refused)"
            )
    return ValidRecord(record, value)


def select_record(key: str, values: list[bytes]) -> int:
    """Index of the best valid value for `key` (highest sequence), for the DHT's select step; -1 if none."""
    best, best_seq = -1, -1
    for i, value in enumerate(values):
        try:
            seq = validate_record(key, value).record.seq
        except RecordRejected:
            continue
        if seq > best_seq:
            best, best_seq = i, seq
    return best
