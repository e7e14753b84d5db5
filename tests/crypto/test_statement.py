"""in-toto Statement v1 with the Mirador predicate: build/parse round trip, schema refusals, folder digests."""

import hashlib
import json
import os
from enum import Enum, auto
from pathlib import Path
from typing import Any

import pytest

from crypto.dsse import parse_envelope
from crypto.identity import Identity
from crypto.statement import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    StatementError,
    build_statement,
    check_subject_name,
    folder_digests,
    parse_statement,
    sign_statement,
)

A = hashlib.sha256(b"a").hexdigest()
B = hashlib.sha256(b"b").hexdigest()
MANIFEST = {"name": "tutor", "version": "1.0.0", "files": {"adapter.gguf": {"size": 1}}}


def test_build_and_parse_round_trip() -> None:
    ident = Identity.generate()
    statement = build_statement({"z/adapter.gguf": B, "README.md": A}, MANIFEST, ident.public_key)

    parsed = parse_statement(statement.to_json())

    assert parsed == statement
    assert [s.name for s in parsed.subjects] == ["README.md", "z/adapter.gguf"]
    assert parsed.digests() == {"README.md": A, "z/adapter.gguf": B}
    assert parsed.manifest == MANIFEST and parsed.publisher == ident.public_key


def test_json_is_an_in_toto_statement_v1() -> None:
    ident = Identity.generate()

    doc = json.loads(build_statement({"f": A}, MANIFEST, ident.public_key).to_json())

    assert doc["_type"] == STATEMENT_TYPE == "https://in-toto.io/Statement/v1"
    assert doc["subject"] == [{"name": "f", "digest": {"sha256": A}}]
    assert doc["predicateType"] == PREDICATE_TYPE
    assert doc["predicate"]["publisher"] == {"key": ident.public_key_b64(), "fingerprint": ident.fingerprint}
    assert doc["predicate"]["name"] == "tutor"


def test_sign_statement_makes_an_in_toto_envelope() -> None:
    ident = Identity.generate()
    statement = build_statement({"f": A}, MANIFEST, ident.public_key)

    envelope = parse_envelope(sign_statement(ident, statement).to_json())

    assert envelope.payload_type == PAYLOAD_TYPE == "application/vnd.in-toto+json"
    assert parse_statement(envelope.payload) == statement


def test_sign_statement_refuses_another_identity() -> None:
    statement = build_statement({"f": A}, MANIFEST, Identity.generate().public_key)

    with pytest.raises(StatementError, match=r"names publisher .* but the signing identity"):
        sign_statement(Identity.generate(), statement)


def test_build_refuses_a_manifest_that_sets_publisher() -> None:
    with pytest.raises(StatementError, match="may not set 'publisher'"):
        build_statement({"f": A}, {"publisher": "me"}, Identity.generate().public_key)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../x", r"not a plain relative path"),
        ("a/../../x", r"not a plain relative path"),
        ("./a", r"not a plain relative path"),
        ("a//b", r"not a plain relative path"),
        ("a/", r"not a plain relative path"),
        ("..", r"not a plain relative path"),
        ("/etc/passwd", r"absolute path"),
        ("C:/Windows", r"absolute path"),
        ("a\\b", r"backslash"),
        ("..\\x", r"backslash"),
        ("a\x00b", r"control character"),
        ("a\nb", r"control character"),
        ("", r"empty"),
        ("x" * 1025, r"longer than 1024 bytes"),
    ],
)
def test_unsafe_subject_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(StatementError, match=message):
        check_subject_name(name)
    with pytest.raises(StatementError, match=message):
        build_statement({name: A}, {}, Identity.generate().public_key)


@pytest.mark.parametrize("name", ["model.gguf", "a/b/c.bin", "dir.with.dots/..hidden", "ünïcode/名前.txt"])
def test_safe_subject_names_pass(name: str) -> None:
    check_subject_name(name)


class Fault(Enum):
    NOT_JSON = auto()
    WRONG_TYPE = auto()
    WRONG_PREDICATE_TYPE = auto()
    UNKNOWN_FIELD = auto()
    UNKNOWN_SUBJECT_FIELD = auto()
    OTHER_DIGEST_ALGORITHM = auto()
    UPPERCASE_HEX = auto()
    SHORT_HEX = auto()
    DUPLICATE_NAME = auto()
    TRAVERSAL_NAME = auto()
    FILE_AND_FOLDER = auto()
    NO_SUBJECTS = auto()
    NO_PUBLISHER = auto()
    PUBLISHER_UNKNOWN_FIELD = auto()
    PUBLISHER_BAD_KEY = auto()
    PUBLISHER_FINGERPRINT_MISMATCH = auto()


def _faulty(fault: Fault) -> bytes:
    """A valid statement's JSON with exactly one fault applied."""
    doc: dict[str, Any] = json.loads(
        build_statement({"a": A, "b/c": B}, MANIFEST, Identity.generate().public_key).to_json()
    )
    subject, predicate = doc["subject"], doc["predicate"]
    match fault:
        case Fault.NOT_JSON:
            return b"\x00"
        case Fault.WRONG_TYPE:
            doc["_type"] = "https://in-toto.io/Statement/v0.1"
        case Fault.WRONG_PREDICATE_TYPE:
            doc["predicateType"] = "https://model_signing/signature/v1.0"
        case Fault.UNKNOWN_FIELD:
            doc["extra"] = 1
        case Fault.UNKNOWN_SUBJECT_FIELD:
            subject[0]["uri"] = "https://example.com/a"
        case Fault.OTHER_DIGEST_ALGORITHM:
            subject[0]["digest"] = {"sha512": A + A}
        case Fault.UPPERCASE_HEX:
            subject[0]["digest"]["sha256"] = A.upper()
        case Fault.SHORT_HEX:
            subject[0]["digest"]["sha256"] = A[:63]
        case Fault.DUPLICATE_NAME:
            subject[1]["name"] = "a"
        case Fault.TRAVERSAL_NAME:
            subject[1]["name"] = "../../.bashrc"
        case Fault.FILE_AND_FOLDER:
            subject[0]["name"] = "b"
        case Fault.NO_SUBJECTS:
            doc["subject"] = []
        case Fault.NO_PUBLISHER:
            del predicate["publisher"]
        case Fault.PUBLISHER_UNKNOWN_FIELD:
            predicate["publisher"]["name"] = "me"
        case Fault.PUBLISHER_BAD_KEY:
            predicate["publisher"]["key"] = "AAAA"
        case Fault.PUBLISHER_FINGERPRINT_MISMATCH:
            predicate["publisher"]["fingerprint"] = Identity.generate().fingerprint
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault.NOT_JSON, "JSON is malformed"),
        (Fault.WRONG_TYPE, "_type is 'https://in-toto.io/Statement/v0.1', expected"),
        (Fault.WRONG_PREDICATE_TYPE, "predicateType is 'https://model_signing/signature/v1.0', expected"),
        (Fault.UNKNOWN_FIELD, "unknown field `extra`"),
        (Fault.UNKNOWN_SUBJECT_FIELD, r"unknown field `uri` - at `\$.subject\[0\]`"),
        (Fault.OTHER_DIGEST_ALGORITHM, r"unknown field `sha512`"),
        (Fault.UPPERCASE_HEX, "sha256 must be 64 lowercase hex"),
        (Fault.SHORT_HEX, "sha256 must be 64 lowercase hex"),
        (Fault.DUPLICATE_NAME, "subject name 'a' appears twice"),
        (Fault.TRAVERSAL_NAME, r"'../../.bashrc' is not a plain relative path"),
        (Fault.FILE_AND_FOLDER, "subject 'b' is a file and also the folder of 'b/c'"),
        (Fault.NO_SUBJECTS, "no subjects"),
        (Fault.NO_PUBLISHER, "predicate has no 'publisher'"),
        (Fault.PUBLISHER_UNKNOWN_FIELD, "predicate.publisher: Object contains unknown field `name`"),
        (Fault.PUBLISHER_BAD_KEY, "predicate.publisher: an Ed25519 public key is 32 bytes"),
        (Fault.PUBLISHER_FINGERPRINT_MISMATCH, "fingerprint .* is not that of its key"),
    ],
)
def test_parse_refuses(fault: Fault, message: str) -> None:
    data = _faulty(fault)

    with pytest.raises(StatementError, match=message):
        parse_statement(data)


def test_folder_digests_hash_every_file_in_chunks(tmp_path: Path) -> None:
    big = os.urandom(3 * 1024 * 1024 + 7)  # spans many read chunks
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "big.bin").write_bytes(big)
    (tmp_path / "a.txt").write_bytes(b"a")
    (tmp_path / "model.dsse.json").write_bytes(b"{}")

    digests = folder_digests(tmp_path, ignore=frozenset({"model.dsse.json"}))

    assert digests == {"a.txt": A, "sub/big.bin": hashlib.sha256(big).hexdigest()}


def test_folder_digests_refuse_symlinks(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a")
    (tmp_path / "link").symlink_to("/etc/hostname")

    with pytest.raises(StatementError, match=r"link .* is a symlink or special file"):
        folder_digests(tmp_path)
