"""Verification of signed artifacts: the trust policy, envelope -> statement -> files.

As in sigstore-python 3.x, a check that fails raises a VerificationError (crypto.refusal) with a reason code and a
detail; a check that passes returns (verify_artifact: the VerifiedArtifact).

Trust: the statement carries the publisher's key (crypto.statement); the envelope must hold a signature with
keyid = that key's fingerprint which verifies over PAE(payloadType, payload); then the TrustPolicy must name
that fingerprint, or explicitly allow untrusted publishers (the CLI's --trust-publisher). An empty policy is
refused, never read as "trust all".
"""

import errno
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from crypto.dsse import Envelope, parse_envelope, signature_is_valid
from crypto.identity import PublicKey, is_fingerprint
from crypto.refusal import VerificationError
from crypto.statement import (
    PAYLOAD_TYPE,
    Statement,
    StatementError,
    check_subject_name,
    open_inside,
    parse_statement,
    sha256_of,
    walk_files,
)

EMPTY_POLICY_REASON = "empty trust policy: trust at least one publisher"
_MAX_LISTED_PROBLEMS = 5


@dataclass(frozen=True)
class VerifiedArtifact:
    """A valid signature by the statement's publisher, who the policy trusts or explicitly allowed."""

    statement: Statement
    publisher_trusted: bool

    @property
    def publisher(self) -> PublicKey:
        """The key that signed (statement.publisher)."""
        return self.statement.publisher


class EmptyTrustPolicyError(ValueError):
    """A trust policy that trusts no publisher and does not explicitly allow untrusted ones."""


class TrustPolicy:
    """The publishers (fingerprints) whose artifacts are accepted; empty is refused, never 'trust all'."""

    def __init__(self, publishers: Iterable[str | PublicKey], *, allow_untrusted: bool = False) -> None:
        if isinstance(publishers, str):
            raise TypeError("publishers is a collection of fingerprints or keys, not one string")
        fingerprints = frozenset(p.fingerprint if isinstance(p, PublicKey) else p for p in publishers)
        bad = sorted(f for f in fingerprints if not is_fingerprint(f))
        if bad:
            raise ValueError(f"not a publisher fingerprint ('ed25519:' + 32 lowercase hex): {bad[0]!r}")
        if not fingerprints and not allow_untrusted:
            raise EmptyTrustPolicyError(EMPTY_POLICY_REASON)
        self._fingerprints = fingerprints
        self._allow_untrusted = allow_untrusted

    @property
    def fingerprints(self) -> frozenset[str]:
        """The trusted publishers' fingerprints."""
        return self._fingerprints

    @property
    def allow_untrusted(self) -> bool:
        """Whether a valid signature by a publisher outside the list is accepted (explicit override)."""
        return self._allow_untrusted

    def trusts(self, fingerprint: str) -> bool:
        """True if `fingerprint` is in the trusted list."""
        return fingerprint in self._fingerprints

    def with_publisher(self, publisher: str | PublicKey) -> "TrustPolicy":
        """A copy of this policy that also trusts `publisher`."""
        return TrustPolicy([*self._fingerprints, publisher], allow_untrusted=self._allow_untrusted)

    def __repr__(self) -> str:
        return f"TrustPolicy({sorted(self._fingerprints)!r}, allow_untrusted={self._allow_untrusted})"


def verify_envelope(envelope: Envelope, public_key: PublicKey) -> None:
    """Return if a signature with keyid = the key's fingerprint verifies over PAE(type, payload); else raise
    VerificationError (unsigned, no_publisher_signature, bad_signature)."""
    if not envelope.signatures:
        raise VerificationError("unsigned", "unsigned (no signatures)")
    mine = envelope.signatures_by(public_key.fingerprint)
    if not mine:
        keyids = ", ".join(sorted({s.keyid or "(none)" for s in envelope.signatures}))
        detail = f"no signature by the publisher {public_key.fingerprint} (keyids: {keyids})"
        raise VerificationError("no_publisher_signature", detail)
    if not any(signature_is_valid(envelope, s, public_key) for s in mine):
        raise VerificationError("bad_signature", "bad signature")


def verify_artifact(envelope_bytes: bytes, policy: TrustPolicy) -> VerifiedArtifact:
    """Parse a DSSE envelope, its in-toto statement and publisher, check the signature and the trust policy; raise
    VerificationError (empty_policy, bad_envelope, bad_statement, a signature reason, untrusted_publisher)."""
    if not policy.fingerprints and not policy.allow_untrusted:
        raise VerificationError("empty_policy", EMPTY_POLICY_REASON)
    envelope = parse_envelope(envelope_bytes, expected_payload_type=PAYLOAD_TYPE)
    try:
        statement = parse_statement(envelope.payload)
    except StatementError as exc:
        detail = f"payload is not a valid Mirador in-toto Statement v1: {exc.detail}"
        raise VerificationError(exc.reason, detail) from None
    verify_envelope(envelope, statement.publisher)
    fingerprint = statement.publisher.fingerprint
    trusted = policy.trusts(fingerprint)
    if not trusted and not policy.allow_untrusted:
        raise VerificationError("untrusted_publisher", f"publisher {fingerprint} is not trusted")
    return VerifiedArtifact(statement, publisher_trusted=trusted)


def _open_problem(name: str, exc: OSError) -> str:
    """Why subject `name` could not be opened, in words."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"{name}: missing"
    if exc.errno == errno.ELOOP:
        return f"{name}: symlink on its path (refused)"
    if isinstance(exc, IsADirectoryError):
        return f"{name}: not a regular file"
    return f"{name}: cannot be read ({exc.strerror or exc})"


def _failure(problems: list[str]) -> VerificationError:
    """One failure listing the first problems."""
    more = len(problems) - _MAX_LISTED_PROBLEMS
    text = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
    return VerificationError("files_differ", text + (f" (and {more} more)" if more > 0 else ""))


def verify_files(
    statement: Statement,
    folder: Path,
    *,
    allow_extra: bool = False,
    ignore: Collection[str] = (),
    sizes: Mapping[str, int] | None = None,
    hashed: Mapping[str, str] | None = None,
) -> None:
    """Check `folder` against the statement's subjects: each present (no symlinks), sizes, sha256, no extras;
    raise VerificationError (files_differ) listing the first problems.

    Cheap checks (names, presence, sizes, extra files) run before any hashing; files are hashed in chunks.
    `sizes` (name -> bytes, e.g. from the manifest) is optional; `ignore` names files outside the artifact
    (such as the envelope itself); `allow_extra` accepts unlisted files. `hashed` (name -> sha256 hex) holds the
    digests of files the caller has just written into its own private folder and hashed as it wrote them: those
    are compared instead of read and hashed again.
    """
    if not folder.is_dir():
        raise VerificationError("files_differ", f"{folder} is not a folder")
    problems: list[str] = []
    signed = statement.digests()
    for name in signed:
        try:
            check_subject_name(name)
        except StatementError as exc:
            problems.append(exc.detail)
    if problems:
        raise _failure(problems)
    if not allow_extra:
        problems += [
            f"{name}: {'' if regular else 'symlink or special file, '}not in the signed statement"
            for name, regular in sorted(walk_files(folder))
            if name not in signed and name not in ignore
        ]
    for name in signed:
        try:
            with open_inside(folder, name) as f:
                size = f.seek(0, 2)
        except OSError as exc:
            problems.append(_open_problem(name, exc))
            continue
        if sizes is not None and name in sizes and sizes[name] != size:
            problems.append(f"{name}: {size} bytes, the manifest says {sizes[name]}")
    if problems:
        raise _failure(sorted(problems))
    for name, expected in signed.items():
        if hashed is not None and name in hashed:
            if hashed[name] != expected:
                problems.append(f"{name}: sha256 {hashed[name]} does not match the signed {expected}")
            continue
        try:
            with open_inside(folder, name) as f:
                actual = sha256_of(f)
        except OSError as exc:
            problems.append(_open_problem(name, exc))
            continue
        if actual != expected:
            problems.append(f"{name}: sha256 {actual} does not match the signed {expected}")
    if problems:
        raise _failure(problems)
