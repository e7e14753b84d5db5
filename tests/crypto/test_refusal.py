"""One refusal vocabulary: every protocol's and verifier's refusal is a `Refused` with a reason code and a detail."""

import importlib

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
