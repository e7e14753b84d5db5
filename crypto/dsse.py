"""DSSE v1 envelopes (github.com/secure-systems-lab/dsse, envelope.md and protocol.md) signed by an Identity.

Wire form (JSON): {"payloadType": str, "payload": base64(body), "signatures": [{"keyid": str, "sig": base64}]}.
Each signature is Ed25519 over PAE(payloadType, body). `keyid` is the signer's fingerprint
('ed25519:' + 32 hex, see crypto.identity); DSSE leaves keyid unauthenticated, so it is only a hint for picking
the key: the key itself and the decision to trust it come from elsewhere (crypto.verification).

Parsing is strict: size limits first, then a msgspec strict schema (unknown fields refused), then base64 that
must be standard, padded and canonical (the spec also allows URL-safe; Mirador writes standard and reads only
that, so every envelope has one encoding). Envelopes with no signatures are refused.
"""

import base64
from dataclasses import dataclass
from typing import Annotated

import msgspec

from crypto.identity import Identity, PublicKey, strict_b64decode
from crypto.refusal import SingleReason, VerificationError

MAX_ENVELOPE_BYTES = 8 * 1024 * 1024
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_SIGNATURES = 8
_MAX_PAYLOAD_TYPE_CHARS = 256
_MAX_KEYID_CHARS = 256
_MAX_SIG_B64_CHARS = 1024


class EnvelopeError(SingleReason, VerificationError):
    """Bytes that are not an acceptable DSSE envelope (reason bad_envelope); the detail says what is wrong."""

    REASON = "bad_envelope"


class _WireSignature(msgspec.Struct, forbid_unknown_fields=True):
    sig: Annotated[str, msgspec.Meta(max_length=_MAX_SIG_B64_CHARS)]
    keyid: Annotated[str, msgspec.Meta(max_length=_MAX_KEYID_CHARS)] = ""


class _WireEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    payload_type: Annotated[str, msgspec.Meta(max_length=_MAX_PAYLOAD_TYPE_CHARS)] = msgspec.field(name="payloadType")
    payload: str
    signatures: Annotated[list[_WireSignature], msgspec.Meta(max_length=MAX_SIGNATURES)]


_decoder = msgspec.json.Decoder(_WireEnvelope)


@dataclass(frozen=True)
class Signature:
    """One DSSE signature: the signer's keyid (a fingerprint) and the raw signature bytes."""

    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A decoded DSSE envelope: payload type, payload bytes, signatures."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_json(self) -> bytes:
        """The envelope as DSSE JSON (standard base64)."""
        wire = _WireEnvelope(
            payload_type=self.payload_type,
            payload=_b64(self.payload),
            signatures=[_WireSignature(sig=_b64(s.sig), keyid=s.keyid) for s in self.signatures],
        )
        return msgspec.json.encode(wire)

    def signatures_by(self, keyid: str) -> tuple[Signature, ...]:
        """The signatures whose keyid is `keyid`."""
        return tuple(s for s in self.signatures if s.keyid == keyid)


def _b64(data: bytes) -> str:
    """Standard base64 with padding."""
    return base64.b64encode(data).decode("ascii")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSEv1 pre-authentication encoding: "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body (byte lengths)."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_envelope(identity: Identity, payload_type: str, payload: bytes) -> Envelope:
    """Sign `payload` as `payload_type` with `identity`; keyid = the identity's fingerprint."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise EnvelopeError(f"payload is {len(payload)} bytes, more than the limit of {MAX_PAYLOAD_BYTES}")
    sig = identity.sign(pae(payload_type, payload))
    return Envelope(payload_type, payload, (Signature(identity.fingerprint, sig),))


def signature_is_valid(envelope: Envelope, signature: Signature, public_key: PublicKey) -> bool:
    """True only if `signature` is `public_key`'s signature of PAE(envelope type, envelope payload)."""
    return public_key.verify(signature.sig, pae(envelope.payload_type, envelope.payload))


def parse_envelope(data: bytes, *, expected_payload_type: str | None = None) -> Envelope:
    """Decode DSSE JSON strictly (size limits, schema, base64, >= 1 signature); raise EnvelopeError naming the fault."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"envelope is {len(data)} bytes, more than the limit of {MAX_ENVELOPE_BYTES}")
    try:
        wire = _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise EnvelopeError(f"not a DSSE envelope: {exc}") from exc
    if not wire.signatures:
        raise EnvelopeError("unsigned (no signatures)")
    if expected_payload_type is not None and wire.payload_type != expected_payload_type:
        raise EnvelopeError(f"payloadType is {wire.payload_type!r}, expected {expected_payload_type!r}")
    if len(wire.payload) > (MAX_PAYLOAD_BYTES + 2) // 3 * 4:
        raise EnvelopeError(f"payload is larger than the limit of {MAX_PAYLOAD_BYTES} bytes")
    try:
        payload = strict_b64decode(wire.payload)
    except ValueError as exc:
        raise EnvelopeError(f"payload: {exc}") from exc
    signatures = []
    for i, s in enumerate(wire.signatures):
        try:
            signatures.append(Signature(s.keyid, strict_b64decode(s.sig)))
        except ValueError as exc:
            raise EnvelopeError(f"signatures[{i}].sig: {exc}") from exc
    return Envelope(wire.payload_type, payload, tuple(signatures))
