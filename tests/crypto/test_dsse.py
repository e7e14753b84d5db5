"""DSSE v1 envelopes: PAE known answers, sign/parse round trip, strict parsing refusals."""

import base64
import json
import re
from enum import Enum, auto
from typing import Any

import pytest

from crypto.dsse import (
    MAX_ENVELOPE_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_SIGNATURES,
    EnvelopeError,
    pae,
    parse_envelope,
    sign_envelope,
    signature_is_valid,
)
from crypto.identity import Identity

TYPE = "application/vnd.in-toto+json"


@pytest.mark.parametrize(
    ("payload_type", "body", "expected"),
    [
        # The worked example of DSSE protocol.md.
        ("http://example.com/HelloWorld", b"hello world", b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"),
        ("", b"", b"DSSEv1 0  0 "),
        # Lengths are byte counts of the UTF-8 type and of the body, not character counts.
        ("é", "ಠ".encode(), "DSSEv1 2 é 3 ಠ".encode()),
    ],
    ids=["spec-example", "empty", "utf8-lengths"],
)
def test_pae_known_answers(payload_type: str, body: bytes, expected: bytes) -> None:
    assert pae(payload_type, body) == expected


def test_sign_and_parse_round_trip() -> None:
    ident = Identity.generate()

    envelope = sign_envelope(ident, TYPE, b'{"hello": "world"}')
    parsed = parse_envelope(envelope.to_json(), expected_payload_type=TYPE)

    assert parsed == envelope
    assert [s.keyid for s in parsed.signatures] == [ident.fingerprint]
    assert signature_is_valid(parsed, parsed.signatures[0], ident.public_key)
    assert not signature_is_valid(parsed, parsed.signatures[0], Identity.generate().public_key)


def test_wire_form_is_plain_dsse_json() -> None:
    ident = Identity.generate()

    doc = json.loads(sign_envelope(ident, TYPE, b"body").to_json())

    assert set(doc) == {"payloadType", "payload", "signatures"}
    assert base64.b64decode(doc["payload"]) == b"body"
    (sig,) = doc["signatures"]
    assert set(sig) == {"keyid", "sig"} and sig["keyid"] == ident.fingerprint
    assert ident.public_key.verify(base64.b64decode(sig["sig"]), pae(TYPE, b"body"))


def test_sign_refuses_an_oversized_payload() -> None:
    with pytest.raises(EnvelopeError, match="limit"):
        sign_envelope(Identity.generate(), TYPE, b"x" * (MAX_PAYLOAD_BYTES + 1))


class Fault(Enum):
    NOT_JSON = auto()
    NOT_AN_OBJECT = auto()
    ZERO_SIGNATURES = auto()
    TOO_MANY_SIGNATURES = auto()
    UNKNOWN_FIELD = auto()
    UNKNOWN_SIGNATURE_FIELD = auto()
    MISSING_PAYLOAD = auto()
    WRONG_PAYLOAD_TYPE = auto()
    NON_BASE64_PAYLOAD = auto()
    URLSAFE_PAYLOAD = auto()
    UNPADDED_PAYLOAD = auto()
    NONCANONICAL_PAYLOAD = auto()
    NON_BASE64_SIG = auto()
    OVERSIZED_PAYLOAD = auto()
    OVERSIZED_ENVELOPE = auto()


def _faulty(fault: Fault) -> bytes:
    """A valid signed envelope with exactly one fault applied, as bytes."""
    env = sign_envelope(Identity.generate(), TYPE, b"\xfb\xff payload with url-unsafe base64 \xfe")
    doc: dict[str, Any] = json.loads(env.to_json())
    match fault:
        case Fault.NOT_JSON:
            return b"{not json"
        case Fault.NOT_AN_OBJECT:
            return b"[]"
        case Fault.ZERO_SIGNATURES:
            doc["signatures"] = []
        case Fault.TOO_MANY_SIGNATURES:
            doc["signatures"] = doc["signatures"] * (MAX_SIGNATURES + 1)
        case Fault.UNKNOWN_FIELD:
            doc["payloadEncoding"] = "utf-8"
        case Fault.UNKNOWN_SIGNATURE_FIELD:
            doc["signatures"][0]["cert"] = "..."
        case Fault.MISSING_PAYLOAD:
            del doc["payload"]
        case Fault.WRONG_PAYLOAD_TYPE:
            doc["payloadType"] = "text/plain"
        case Fault.NON_BASE64_PAYLOAD:
            doc["payload"] = "not*base64"
        case Fault.URLSAFE_PAYLOAD:
            doc["payload"] = base64.urlsafe_b64encode(base64.b64decode(doc["payload"])).decode()
        case Fault.UNPADDED_PAYLOAD:
            doc["payload"] = base64.b64encode(b"ab").decode().rstrip("=")
        case Fault.NONCANONICAL_PAYLOAD:
            doc["payload"] = "YWJ="  # decodes to b"ab" only by dropping set padding bits; canonical is "YWI="
        case Fault.NON_BASE64_SIG:
            doc["signatures"][0]["sig"] = "!!"
        case Fault.OVERSIZED_PAYLOAD:
            doc["payload"] = base64.b64encode(b"x" * (MAX_PAYLOAD_BYTES + 3)).decode()
        case Fault.OVERSIZED_ENVELOPE:
            return b" " * (MAX_ENVELOPE_BYTES + 1)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault.NOT_JSON, "not a DSSE envelope: JSON is malformed"),
        (Fault.NOT_AN_OBJECT, "not a DSSE envelope: Expected `object`"),
        (Fault.ZERO_SIGNATURES, r"^unsigned \(no signatures\)$"),
        (Fault.TOO_MANY_SIGNATURES, r"length <= 8 - at `\$.signatures`"),
        (Fault.UNKNOWN_FIELD, "unknown field `payloadEncoding`"),
        (Fault.UNKNOWN_SIGNATURE_FIELD, r"unknown field `cert` - at `\$.signatures\[0\]`"),
        (Fault.MISSING_PAYLOAD, "missing required field `payload`"),
        (Fault.WRONG_PAYLOAD_TYPE, "payloadType is 'text/plain', expected 'application/vnd.in-toto"),
        (Fault.NON_BASE64_PAYLOAD, "payload: not standard base64"),
        (Fault.URLSAFE_PAYLOAD, "payload: not standard base64"),
        (Fault.UNPADDED_PAYLOAD, "payload: not standard base64"),
        (Fault.NONCANONICAL_PAYLOAD, "payload: not canonical base64"),
        (Fault.NON_BASE64_SIG, r"signatures\[0\].sig: not standard base64"),
        (Fault.OVERSIZED_PAYLOAD, "payload is larger than the limit"),
        (Fault.OVERSIZED_ENVELOPE, "envelope is .* bytes, more than the limit"),
    ],
)
def test_parse_refuses(fault: Fault, message: str) -> None:
    data = _faulty(fault)

    with pytest.raises(EnvelopeError) as refused:
        parse_envelope(data, expected_payload_type=TYPE)

    assert refused.value.reason == "bad_envelope"
    assert re.search(message, refused.value.detail), refused.value.detail
