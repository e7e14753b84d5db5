"""in-toto Statement v1 (github.com/in-toto/attestation, spec/v1) carrying a Mirador manifest, and its files.

One subject per artifact file: {"name": relative path, "digest": {"sha256": hex}}. The predicate type is
PREDICATE_TYPE = "https://mirador.dev/manifest/v1" (a URI Mirador owns and versions; in-toto only asks for a
unique URI). The predicate is the Mirador manifest (a JSON object, free-form here) plus one reserved field
that this module adds and checks: "publisher": {"key": base64 raw Ed25519 public key, "fingerprint": ...}.
A DSSE keyid cannot give the key, so the statement carries it, inside what is signed.

Stricter than in-toto's parsing rules (Mirador only reads statements Mirador writes): unknown fields in the
statement, a subject or the publisher are refused; digests must be exactly {"sha256": 64 lowercase hex};
names must be unique, plain relative POSIX paths (no "..", ".", empty parts, leading "/", backslash, drive, or
control characters), and no name may be a folder of another.
"""

import errno
import hashlib
import io
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from crypto.dsse import Envelope, sign_envelope
from crypto.identity import Identity, KeyFormatError, PublicKey
from crypto.refusal import SingleReason, VerificationError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
PREDICATE_TYPE = "https://mirador.dev/manifest/v1"
PUBLISHER_FIELD = "publisher"
MAX_NAME_BYTES = 1024
_HEX = frozenset("0123456789abcdef")


class StatementError(SingleReason, VerificationError):
    """A statement (or a subject name) that Mirador refuses (reason bad_statement); the detail says what is wrong."""

    REASON = "bad_statement"


class _WireDigest(msgspec.Struct, forbid_unknown_fields=True):
    sha256: str


class _WireSubject(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    digest: _WireDigest


class _WirePublisher(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    fingerprint: str


class _WireStatement(msgspec.Struct, forbid_unknown_fields=True):
    type: str = msgspec.field(name="_type")
    subject: list[_WireSubject] = msgspec.field(name="subject")
    predicate_type: str = msgspec.field(name="predicateType")
    predicate: dict[str, Any] = msgspec.field(name="predicate")


_decoder = msgspec.json.Decoder(_WireStatement)


@dataclass(frozen=True)
class Subject:
    """One signed file: its relative path inside the artifact folder and its sha256 (lowercase hex)."""

    name: str
    sha256: str


@dataclass(frozen=True)
class Statement:
    """A checked Mirador statement: subjects sorted by name, the manifest, the publisher's key."""

    subjects: tuple[Subject, ...]
    manifest: dict[str, Any] = field(hash=False)
    publisher: PublicKey

    @property
    def predicate(self) -> dict[str, Any]:
        """The predicate as signed: the manifest plus the publisher field."""
        key = {"key": self.publisher.to_b64(), "fingerprint": self.publisher.fingerprint}
        return {**self.manifest, PUBLISHER_FIELD: key}

    def digests(self) -> dict[str, str]:
        """Subject name -> sha256 hex."""
        return {s.name: s.sha256 for s in self.subjects}

    def to_json(self) -> bytes:
        """The statement as in-toto JSON with sorted keys (the DSSE payload)."""
        doc = {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": s.name, "digest": {"sha256": s.sha256}} for s in self.subjects],
            "predicateType": PREDICATE_TYPE,
            "predicate": self.predicate,
        }
        return msgspec.json.encode(doc, order="sorted")


def check_subject_name(name: str) -> None:
    """Raise StatementError unless `name` is a plain relative POSIX path that stays inside its folder."""
    if not name:
        raise StatementError("subject name is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise StatementError(f"subject name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    if "\\" in name:
        raise StatementError(f"subject name {name!r} contains a backslash")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise StatementError(f"subject name {name!r} contains a control character")
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":" and name[0].isascii() and name[0].isalpha()):
        raise StatementError(f"subject name {name!r} is an absolute path")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise StatementError(f"subject name {name!r} is not a plain relative path (empty, '.' or '..' part)")


def _check_sha256(name: str, digest: str) -> None:
    """Raise StatementError unless `digest` is 64 lowercase hex digits."""
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise StatementError(f"subject {name!r}: sha256 must be 64 lowercase hex digits, got {digest[:80]!r}")


def _checked_subjects(pairs: list[tuple[str, str]]) -> tuple[Subject, ...]:
    """Check names and digests, refuse duplicates and file/folder clashes; sort by name."""
    if not pairs:
        raise StatementError("statement has no subjects")
    names: set[str] = set()
    for name, digest in pairs:
        check_subject_name(name)
        _check_sha256(name, digest)
        if name in names:
            raise StatementError(f"subject name {name!r} appears twice")
        names.add(name)
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if (parent := "/".join(parts[:i])) in names:
                raise StatementError(f"subject {parent!r} is a file and also the folder of {name!r}")
    return tuple(Subject(n, d) for n, d in sorted(pairs))


def build_statement(digests: Mapping[str, str], manifest: Mapping[str, Any], publisher: PublicKey) -> Statement:
    """Build a checked statement from file name -> sha256, the Mirador manifest and the publisher's key."""
    if PUBLISHER_FIELD in manifest:
        raise StatementError(f"the manifest may not set {PUBLISHER_FIELD!r}: the statement adds it")
    subjects = _checked_subjects(list(digests.items()))
    return Statement(subjects, dict(manifest), publisher)


def _publisher_from(predicate: dict[str, Any]) -> PublicKey:
    """The publisher key of a predicate, checked against its fingerprint."""
    if PUBLISHER_FIELD not in predicate:
        raise StatementError(f"predicate has no {PUBLISHER_FIELD!r}")
    try:
        wire = msgspec.convert(predicate[PUBLISHER_FIELD], _WirePublisher)
        key = PublicKey.from_b64(wire.key)
    except (msgspec.ValidationError, KeyFormatError) as exc:
        raise StatementError(f"predicate.{PUBLISHER_FIELD}: {exc}") from exc
    if key.fingerprint != wire.fingerprint:
        raise StatementError(
            f"predicate.{PUBLISHER_FIELD}: fingerprint {wire.fingerprint!r} is not that of its key ({key.fingerprint})"
        )
    return key


def parse_statement(payload: bytes) -> Statement:
    """Decode and check a Mirador in-toto Statement v1; raise StatementError naming the fault."""
    try:
        wire = _decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise StatementError(str(exc)) from exc
    if wire.type != STATEMENT_TYPE:
        raise StatementError(f"_type is {wire.type!r}, expected {STATEMENT_TYPE!r}")
    if wire.predicate_type != PREDICATE_TYPE:
        raise StatementError(f"predicateType is {wire.predicate_type!r}, expected {PREDICATE_TYPE!r}")
    subjects = _checked_subjects([(s.name, s.digest.sha256) for s in wire.subject])
    publisher = _publisher_from(wire.predicate)
    manifest = {k: v for k, v in wire.predicate.items() if k != PUBLISHER_FIELD}
    return Statement(subjects, manifest, publisher)


def sign_statement(identity: Identity, statement: Statement) -> Envelope:
    """Sign `statement` into a DSSE envelope (payloadType application/vnd.in-toto+json) with `identity`."""
    if statement.publisher != identity.public_key:
        raise StatementError(
            f"the statement names publisher {statement.publisher.fingerprint}, "
            f"but the signing identity is {identity.fingerprint}"
        )
    return sign_envelope(identity, PAYLOAD_TYPE, statement.to_json())


def open_inside(folder: Path, name: str) -> io.BufferedReader:
    """Open regular file `name` under `folder` for reading, following no symlink on the way (OSError if not)."""
    check_subject_name(name)
    parts = name.split("/")
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            if stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise OSError(errno.ELOOP, f"{part} is a symlink")
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise IsADirectoryError(f"{name} is not a regular file")
    return f


def sha256_of(f: io.BufferedReader) -> str:
    """sha256 hex of an open binary file, read in chunks."""
    return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 hex of the file at `path`, streamed."""
    with open(path, "rb") as f:
        return sha256_of(f)


def walk_files(folder: Path) -> Iterator[tuple[str, bool]]:
    """Every non-folder entry under `folder` as (relative POSIX name, is a regular file); symlinks not followed."""
    stack = [(folder, "")]
    while stack:
        path, prefix = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), rel + "/"))
                else:
                    yield rel, entry.is_file(follow_symlinks=False)


def folder_digests(folder: Path, *, ignore: frozenset[str] = frozenset()) -> dict[str, str]:
    """Name -> sha256 of every file under `folder` (except `ignore`); refuse symlinks and special files."""
    digests: dict[str, str] = {}
    for name, regular in sorted(walk_files(folder)):
        if name in ignore:
            continue
        if not regular:
            raise StatementError(f"{name} in {folder} is a symlink or special file: an artifact holds regular files")
        check_subject_name(name)
        with open_inside(folder, name) as f:
            digests[name] = sha256_of(f)
    return digests
