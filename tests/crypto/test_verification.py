"""Artifact verification: VerificationError refusals, trust policy, envelope refusals, files against subjects."""

import base64
import hashlib
import json
import re
from enum import Enum, auto
from pathlib import Path
from typing import Any

import pytest

from crypto.dsse import MAX_ENVELOPE_BYTES, sign_envelope
from crypto.identity import Identity
from crypto.refusal import Refused, VerificationError
from crypto.statement import PAYLOAD_TYPE, Statement, Subject, build_statement, folder_digests, sign_statement
from crypto.verification import (
    EMPTY_POLICY_REASON,
    EmptyTrustPolicyError,
    TrustPolicy,
    VerifiedArtifact,
    verify_artifact,
    verify_envelope,
    verify_files,
)

PUBLISHER = Identity.generate()
MALLORY = Identity.generate()
MANIFEST = {"name": "tutor", "version": "1.0.0"}
DIGESTS = {"adapter.gguf": hashlib.sha256(b"weights").hexdigest(), "card/README.md": hashlib.sha256(b"hi").hexdigest()}


def _signed(identity: Identity = PUBLISHER, manifest: dict[str, Any] = MANIFEST) -> bytes:
    """A signed envelope over a statement of DIGESTS, as bytes."""
    return sign_statement(identity, build_statement(DIGESTS, manifest, identity.public_key)).to_json()


def test_a_verification_error_is_a_refusal_with_a_reason_and_a_detail() -> None:
    error = VerificationError("bad_signature", "bad signature")

    assert isinstance(error, Refused) and isinstance(error, ValueError)
    assert (error.reason, error.detail, str(error)) == (
        "bad_signature",
        "bad signature",
        "bad_signature: bad signature",
    )


def test_signed_artifact_by_a_trusted_publisher_verifies() -> None:
    envelope = _signed()

    result = verify_artifact(envelope, TrustPolicy([PUBLISHER.fingerprint]))

    assert isinstance(result, VerifiedArtifact)
    assert result.publisher_trusted and result.publisher == PUBLISHER.public_key
    assert result.statement.digests() == DIGESTS and result.statement.manifest == MANIFEST


def test_policy_accepts_public_keys_and_fingerprints() -> None:
    by_key = TrustPolicy([PUBLISHER.public_key])

    assert by_key.trusts(PUBLISHER.fingerprint) and verify_artifact(_signed(), by_key).publisher_trusted


def test_empty_trust_policy_is_refused_not_trust_all() -> None:
    with pytest.raises(EmptyTrustPolicyError) as excinfo:
        TrustPolicy([])

    assert str(excinfo.value) == EMPTY_POLICY_REASON == "empty trust policy: trust at least one publisher"


def test_policy_refuses_malformed_fingerprints() -> None:
    with pytest.raises(ValueError, match="not a publisher fingerprint"):
        TrustPolicy(["ed25519:XYZ"])
    with pytest.raises(TypeError, match="not one string"):
        TrustPolicy(PUBLISHER.fingerprint)


def test_untrusted_publisher_is_refused() -> None:
    with pytest.raises(VerificationError) as refused:
        verify_artifact(_signed(MALLORY), TrustPolicy([PUBLISHER.fingerprint]))

    assert refused.value.reason == "untrusted_publisher"
    assert refused.value.detail == f"publisher {MALLORY.fingerprint} is not trusted"


def test_untrusted_publisher_is_accepted_only_when_explicitly_allowed() -> None:
    allow = TrustPolicy([], allow_untrusted=True)

    result = verify_artifact(_signed(MALLORY), allow)

    assert isinstance(result, VerifiedArtifact)
    assert not result.publisher_trusted and result.publisher.fingerprint == MALLORY.fingerprint


def test_with_publisher_adds_one_trusted_publisher() -> None:
    policy = TrustPolicy([PUBLISHER.fingerprint]).with_publisher(MALLORY.public_key)

    result = verify_artifact(_signed(MALLORY), policy)

    assert isinstance(result, VerifiedArtifact) and result.publisher_trusted


class Fault(Enum):
    TAMPERED_PAYLOAD = auto()
    TAMPERED_SIGNATURE = auto()
    SWAPPED_KEYID = auto()
    ZERO_SIGNATURES = auto()
    UNKNOWN_FIELD = auto()
    WRONG_PAYLOAD_TYPE = auto()
    OVERSIZED = auto()
    NOT_A_STATEMENT = auto()
    IMPERSONATED_PUBLISHER = auto()
    RESIGNED_BY_ANOTHER_PUBLISHER = auto()


def _faulty(fault: Fault) -> bytes:
    """A trusted publisher's valid envelope with exactly one fault applied."""
    doc: dict[str, Any] = json.loads(_signed())
    sig = doc["signatures"][0]
    match fault:
        case Fault.TAMPERED_PAYLOAD:
            statement = json.loads(base64.b64decode(doc["payload"]))
            statement["subject"][0]["digest"]["sha256"] = "0" * 64
            doc["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
        case Fault.TAMPERED_SIGNATURE:
            raw = bytearray(base64.b64decode(sig["sig"]))
            raw[10] ^= 1
            sig["sig"] = base64.b64encode(bytes(raw)).decode()
        case Fault.SWAPPED_KEYID:
            sig["keyid"] = MALLORY.fingerprint
        case Fault.ZERO_SIGNATURES:
            doc["signatures"] = []
        case Fault.UNKNOWN_FIELD:
            doc["signatures"][0]["publicKey"] = PUBLISHER.public_key_b64()
        case Fault.WRONG_PAYLOAD_TYPE:
            return sign_envelope(PUBLISHER, "application/json", base64.b64decode(doc["payload"])).to_json()
        case Fault.OVERSIZED:
            return b"{" + b" " * MAX_ENVELOPE_BYTES + b"}"
        case Fault.NOT_A_STATEMENT:
            return sign_envelope(PUBLISHER, PAYLOAD_TYPE, b'{"_type": "https://in-toto.io/Statement/v1"}').to_json()
        case Fault.IMPERSONATED_PUBLISHER:
            # Mallory names the trusted publisher's key (and keyid) but can only sign with her own key.
            statement = build_statement(DIGESTS, MANIFEST, PUBLISHER.public_key)
            envelope = sign_envelope(MALLORY, PAYLOAD_TYPE, statement.to_json())
            doc = json.loads(envelope.to_json())
            doc["signatures"][0]["keyid"] = PUBLISHER.fingerprint
        case Fault.RESIGNED_BY_ANOTHER_PUBLISHER:
            return _signed(MALLORY, {**MANIFEST, "name": "tutor-evil"})
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("fault", "code", "detail"),
    [
        (Fault.TAMPERED_PAYLOAD, "bad_signature", r"^bad signature$"),
        (Fault.TAMPERED_SIGNATURE, "bad_signature", r"^bad signature$"),
        (
            Fault.SWAPPED_KEYID,
            "no_publisher_signature",
            rf"^no signature by the publisher {PUBLISHER.fingerprint} \(keyids: {MALLORY.fingerprint}\)$",
        ),
        (Fault.ZERO_SIGNATURES, "bad_envelope", r"^unsigned \(no signatures\)$"),
        (Fault.UNKNOWN_FIELD, "bad_envelope", r"unknown field `publicKey`"),
        (
            Fault.WRONG_PAYLOAD_TYPE,
            "bad_envelope",
            r"^payloadType is 'application/json', expected 'application/vnd.in-toto\+json'$",
        ),
        (Fault.OVERSIZED, "bad_envelope", r"more than the limit"),
        (
            Fault.NOT_A_STATEMENT,
            "bad_statement",
            r"^payload is not a valid Mirador in-toto Statement v1: Object missing required field `subject`$",
        ),
        (Fault.IMPERSONATED_PUBLISHER, "bad_signature", r"^bad signature$"),
        (
            Fault.RESIGNED_BY_ANOTHER_PUBLISHER,
            "untrusted_publisher",
            rf"^publisher {MALLORY.fingerprint} is not trusted$",
        ),
    ],
)
def test_verify_artifact_refuses(fault: Fault, code: str, detail: str) -> None:
    data = _faulty(fault)

    with pytest.raises(VerificationError) as refused:
        verify_artifact(data, TrustPolicy([PUBLISHER.fingerprint]))

    assert refused.value.reason == code, refused.value
    assert re.search(detail, refused.value.detail), refused.value.detail


def test_verify_envelope_checks_the_signature_of_one_key() -> None:
    envelope = sign_envelope(PUBLISHER, "t", b"body")

    verify_envelope(envelope, PUBLISHER.public_key)
    with pytest.raises(VerificationError, match=r"^no_publisher_signature: "):
        verify_envelope(envelope, MALLORY.public_key)


# ---- files against the statement's subjects -------------------------------------------------------------


@pytest.fixture
def artifact(tmp_path: Path) -> tuple[Statement, Path]:
    """A folder with two files and the statement of its digests."""
    folder = tmp_path / "artifact"
    (folder / "card").mkdir(parents=True)
    (folder / "adapter.gguf").write_bytes(b"weights")
    (folder / "card" / "README.md").write_bytes(b"hi")
    (tmp_path / "outside").write_bytes(b"secret")
    return build_statement(folder_digests(folder), MANIFEST, PUBLISHER.public_key), folder


def test_files_matching_the_statement_verify(artifact: tuple[Statement, Path]) -> None:
    statement, folder = artifact

    verify_files(statement, folder, sizes={"adapter.gguf": 7, "card/README.md": 2})  # raises on any difference


class FileFault(Enum):
    DIGEST_MISMATCH = auto()
    MISSING_FILE = auto()
    EXTRA_FILE = auto()
    SIZE_MISMATCH = auto()
    SYMLINKED_FILE = auto()
    SYMLINKED_FOLDER = auto()
    FOLDER_INSTEAD_OF_FILE = auto()
    NOT_A_FOLDER = auto()


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (FileFault.DIGEST_MISMATCH, r"^adapter.gguf: sha256 [0-9a-f]{64} does not match the signed [0-9a-f]{64}$"),
        (FileFault.MISSING_FILE, r"^card/README.md: missing$"),
        (FileFault.EXTRA_FILE, r"^notes.txt: not in the signed statement$"),
        (FileFault.SIZE_MISMATCH, r"^adapter.gguf: 8 bytes, the manifest says 7$"),
        (FileFault.SYMLINKED_FILE, r"^adapter.gguf: symlink on its path \(refused\)$"),
        (FileFault.SYMLINKED_FOLDER, r"^card/README.md: symlink on its path \(refused\); card: symlink or special"),
        (FileFault.FOLDER_INSTEAD_OF_FILE, r"^adapter.gguf: not a regular file"),
        (FileFault.NOT_A_FOLDER, r"is not a folder$"),
    ],
)
def test_verify_files_refuses(artifact: tuple[Statement, Path], fault: FileFault, reason: str) -> None:
    statement, folder = artifact
    match fault:
        case FileFault.DIGEST_MISMATCH:
            (folder / "adapter.gguf").write_bytes(b"weightz")
        case FileFault.MISSING_FILE:
            (folder / "card" / "README.md").unlink()
        case FileFault.EXTRA_FILE:
            (folder / "notes.txt").write_bytes(b"")
        case FileFault.SIZE_MISMATCH:
            (folder / "adapter.gguf").write_bytes(b"weights!")
        case FileFault.SYMLINKED_FILE:
            (folder / "adapter.gguf").unlink()
            (folder.parent / "weights").write_bytes(b"weights")
            (folder / "adapter.gguf").symlink_to(folder.parent / "weights")
        case FileFault.SYMLINKED_FOLDER:
            (folder / "card").rename(folder.parent / "card")
            (folder / "card").symlink_to(folder.parent / "card")
        case FileFault.FOLDER_INSTEAD_OF_FILE:
            (folder / "adapter.gguf").unlink()
            (folder / "adapter.gguf").mkdir()
        case FileFault.NOT_A_FOLDER:
            folder = folder / "adapter.gguf"

    with pytest.raises(VerificationError) as refused:
        verify_files(statement, folder, sizes={"adapter.gguf": 7})

    assert refused.value.reason == "files_differ"
    assert re.search(reason, refused.value.detail), refused.value.detail


def test_digests_hashed_while_writing_are_compared_and_still_refuse_a_difference(
    artifact: tuple[Statement, Path],
) -> None:
    # Arrange: the writer's digest of adapter.gguf, one right and one of other bytes
    statement, folder = artifact
    right = hashlib.sha256(b"weights").hexdigest()
    wrong = hashlib.sha256(b"weightz").hexdigest()
    # Act / Assert: the given digest stands for the file (not read again), and a wrong one is refused
    verify_files(statement, folder, hashed={"adapter.gguf": right})
    with pytest.raises(VerificationError, match=rf"adapter.gguf: sha256 {wrong} does not match the signed {right}$"):
        verify_files(statement, folder, hashed={"adapter.gguf": wrong})


def test_extra_files_pass_when_allowed_or_ignored(artifact: tuple[Statement, Path]) -> None:
    statement, folder = artifact
    (folder / "model.dsse.json").write_bytes(b"{}")

    with pytest.raises(VerificationError, match=r"model\.dsse\.json: not in the signed statement"):
        verify_files(statement, folder)
    verify_files(statement, folder, ignore={"model.dsse.json"})
    verify_files(statement, folder, allow_extra=True)


@pytest.mark.parametrize("name", ["../outside", "/etc/hostname", "card\\README.md", "card/../../outside"])
def test_verify_files_refuses_traversal_even_in_a_hand_built_statement(
    artifact: tuple[Statement, Path], name: str
) -> None:
    _, folder = artifact
    statement = Statement((Subject(name, hashlib.sha256(b"secret").hexdigest()),), {}, PUBLISHER.public_key)

    with pytest.raises(VerificationError) as refused:
        verify_files(statement, folder, allow_extra=True)

    assert repr(name) in refused.value.detail


def test_many_problems_are_summarised(artifact: tuple[Statement, Path]) -> None:
    statement, folder = artifact
    for i in range(7):
        (folder / f"extra{i}").write_bytes(b"")

    with pytest.raises(VerificationError) as refused:
        verify_files(statement, folder)

    assert refused.value.detail.endswith("(and 2 more)")
