"""One refusal vocabulary: every protocol's and verifier's refusal is a `Refused` with a reason code and a detail."""

import importlib
from typing import Any

import pytest

from crypto.refusal import Refused, SingleReason, VerificationError
from federation.descriptor import FederationReason, JoinError

# Every exception a peer's or publisher's bytes can raise on their way in (protocols, decoders and verifiers).
REFUSALS = [
    "crypto.dsse:EnvelopeError",
    "crypto.statement:StatementError",
    "crypto.sealing:SealError",
    "crypto.he:HEFormatError",
    "federation.descriptor:DescriptorError",
    "federation.descriptor:InviteError",
    "federation.descriptor:JoinError",
    "federation.messages:MessageError",
    "federation.update:UpdateError",
    "marketplace.artifacts:ArtifactRefused",
    "marketplace.registry_record:RecordRejected",
    "marketplace.cid:CidError",
    "marketplace.unixfs:UnixfsError",
    "marketplace.blockstore:CorruptBlockError",
    "marketplace.manifest:ManifestError",
    "marketplace.formats:FormatError",
    "node.adapters.check:AdapterRejected",
    "node.p2p.framing:FrameError",
    "node.p2p.notices:NoticeError",
    "node.fed.wire:WireError",
    "node.market.block_exchange:WantError",
]


@pytest.mark.parametrize("path", REFUSALS)
def test_every_refusal_is_a_refused(path: str) -> None:
    module, name = path.split(":")

    cls = getattr(importlib.import_module(module), name)

    assert issubclass(cls, Refused), f"{path} is not a crypto.refusal.Refused"


def test_a_single_reason_class_is_raised_with_its_detail_alone() -> None:
    from crypto.dsse import EnvelopeError

    error = EnvelopeError("payloadType is 'x'")

    assert isinstance(error, SingleReason) and isinstance(error, VerificationError)
    assert (error.reason, error.detail, str(error)) == (
        "bad_envelope",
        "payloadType is 'x'",
        "bad_envelope: payloadType is 'x'",
    )


def test_a_closed_set_of_reasons_is_enforced() -> None:
    error = JoinError("stale", "made an hour ago")

    assert error.reason is FederationReason.STALE
    with pytest.raises(ValueError, match="not_a_reason"):
        JoinError("not_a_reason", "a programming error")


INVALID_UTF8 = b'{"schema": "\xfa\xfb", "v": 1}'  # msgspec raises UnicodeDecodeError here, not DecodeError


def decoders() -> list[tuple[str, Any]]:
    from crypto.dsse import parse_envelope
    from federation.descriptor import verify_descriptor
    from federation.messages import decode_update_header
    from marketplace.registry_record import parse_record
    from node.fed import wire as fed_wire
    from node.market.block_exchange import decode_want

    return [
        ("descriptor", verify_descriptor),
        ("update header", decode_update_header),
        ("registry record", parse_record),
        ("envelope", parse_envelope),
        ("welcome", lambda data: fed_wire.decode(data, fed_wire.Welcome, "welcome")),
        ("want", decode_want),
    ]


DEEP = b'{"schema": "x", "deep": ' + b"[" * 100_000 + b"0" + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("data", [INVALID_UTF8, DEEP], ids=["invalid-utf8", "deep-nesting"])
@pytest.mark.parametrize("index", range(6))
def test_undecodable_bytes_are_a_refusal_not_a_crash(index: int, data: bytes) -> None:
    # Arrange (fuzzer findings: UnicodeDecodeError escaped the update handler, RecursionError the join handler)
    name, decode = decoders()[index]

    # Act / Assert
    with pytest.raises(Refused) as refused:
        decode(data)
    assert refused.value.detail, name
