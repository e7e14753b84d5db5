"""The federation's direct-stream protocols: joining (request → welcome) and sending an update to the aggregator.

Both use node.p2p.framing (length + sha256 + ack, a deadline on every read, per-type size limits checked before a
payload is read). Join: the joiner sends `fed.join` (its signed join request); an admitted member answers
`fed.welcome` (the descriptor, every member's signed join request, the HE public context, and for HE members the
secret context sealed to the joiner's X25519 key) or `fed.refused` (the reason). Update: the member sends
`fed.header` (its signed UpdateHeader), then `fed.payload`; the aggregator answers `fed.verdict`.
"""

import base64
from typing import Annotated

import msgspec

from crypto.refusal import Refused, SingleReason
from node.p2p.framing import ByteStream, receive_frame, send_frame

JOIN_PROTOCOL = "/mirador/fed/join/1.0.0"
UPDATE_PROTOCOL = "/mirador/fed/update/1.0.0"
MAX_JOIN = 16 * 1024
MAX_WELCOME = 8 * 1024 * 1024
MAX_HEADER = 8 * 1024
MAX_PAYLOAD = 256 * 1024 * 1024
MAX_VERDICT = 4 * 1024
READ_TIMEOUT_S = 30.0
B64 = Annotated[str, msgspec.Meta(max_length=MAX_WELCOME)]


class WireError(SingleReason):
    """A peer's federation message that is malformed; the message says what was wrong."""

    REASON = "bad_message"


class AdmittedMember(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A member as the federation passes it on (welcome lists, gossip): its signed join request and the creator's
    signed admission of it, both base64."""

    request: Annotated[str, msgspec.Meta(max_length=MAX_JOIN * 2)]
    admission: Annotated[str, msgspec.Meta(max_length=4096)]


def encode_admitted(request: bytes, admission: bytes) -> bytes:
    """An AdmittedMember's JSON bytes."""
    return msgspec.json.encode(AdmittedMember(request=b64(request), admission=b64(admission)))


def decode_admitted(data: bytes) -> tuple[bytes, bytes]:
    """(join request, admission) from an AdmittedMember's JSON bytes; WireError if malformed."""
    member = decode(data, AdmittedMember, "member")
    assert isinstance(member, AdmittedMember)
    return unb64(member.request, "member request"), unb64(member.admission, "member admission")


class JoinRefused(Refused):
    """The member we asked refused our join request: its reason code and detail."""


class Welcome(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """An admitted member's answer to a join request."""

    v: int = 1
    descriptor: B64
    members: Annotated[list[B64], msgspec.Meta(max_length=1024)]
    he_public: B64 = ""
    he_secret_sealed: B64 = ""
    global_round: Annotated[int, msgspec.Meta(ge=0)] = 0
    global_cid: Annotated[str, msgspec.Meta(max_length=128)] = ""


class Refusal(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Why a join request or an update was refused."""

    v: int = 1
    reason: Annotated[str, msgspec.Meta(max_length=64)]
    detail: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class Verdict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The aggregator's answer to an update."""

    v: int = 1
    accepted: bool
    reason: Annotated[str, msgspec.Meta(max_length=64)] = ""
    detail: Annotated[str, msgspec.Meta(max_length=1024)] = ""


def b64(data: bytes) -> str:
    """Standard base64 text."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    """Decode standard base64, naming `what` in the error."""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise WireError(f"{what}: not base64") from None


def decode(data: bytes, kind: type[msgspec.Struct], what: str) -> msgspec.Struct:
    """Strictly decode a JSON struct, naming `what` in the error."""
    try:
        return msgspec.json.decode(data, type=kind)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # invalid UTF-8; nesting too deep
        raise WireError(f"{what}: {exc}") from None


async def request_join(stream: ByteStream, join_request: bytes) -> Welcome:
    """Send a join request; return the welcome, or raise WireError with the member's refusal."""
    await send_frame(stream, "fed.join", join_request)
    frame = await receive_frame(
        stream, {"fed.welcome": MAX_WELCOME, "fed.refused": MAX_VERDICT}, read_timeout=READ_TIMEOUT_S
    )
    if frame.msg_type == "fed.refused":
        refusal = decode(frame.payload, Refusal, "refusal")
        assert isinstance(refusal, Refusal)
        raise JoinRefused(refusal.reason, refusal.detail)
    welcome = decode(frame.payload, Welcome, "welcome")
    assert isinstance(welcome, Welcome)
    return welcome


async def read_join(stream: ByteStream) -> bytes:
    """The join request a joiner sent (size-limited, digest-checked)."""
    return (await receive_frame(stream, {"fed.join": MAX_JOIN}, read_timeout=READ_TIMEOUT_S)).payload


async def answer_join(stream: ByteStream, answer: Welcome | Refusal) -> None:
    """Send the welcome or the refusal."""
    kind = "fed.welcome" if isinstance(answer, Welcome) else "fed.refused"
    await send_frame(stream, kind, msgspec.json.encode(answer))


async def send_update(stream: ByteStream, header: bytes, payload: bytes) -> Verdict:
    """Send a signed update header, then its payload; return the aggregator's verdict."""
    await send_frame(stream, "fed.header", header)
    frame = await receive_frame(stream, {"fed.verdict": MAX_VERDICT, "fed.go": 0}, read_timeout=READ_TIMEOUT_S)
    if frame.msg_type == "fed.verdict":  # refused on the header alone
        verdict = decode(frame.payload, Verdict, "verdict")
        assert isinstance(verdict, Verdict)
        return verdict
    await send_frame(stream, "fed.payload", payload, write_timeout=READ_TIMEOUT_S, ack_timeout=READ_TIMEOUT_S * 4)
    frame = await receive_frame(stream, {"fed.verdict": MAX_VERDICT}, read_timeout=READ_TIMEOUT_S * 4)
    verdict = decode(frame.payload, Verdict, "verdict")
    assert isinstance(verdict, Verdict)
    return verdict


async def read_header(stream: ByteStream) -> bytes:
    """An update's signed header."""
    return (await receive_frame(stream, {"fed.header": MAX_HEADER}, read_timeout=READ_TIMEOUT_S)).payload


async def ask_payload(stream: ByteStream, max_bytes: int) -> bytes:
    """Tell the member to send its payload (the header was admitted) and read it (at most `max_bytes`)."""
    await send_frame(stream, "fed.go", b"")
    frame = await receive_frame(
        stream, {"fed.payload": min(max_bytes, MAX_PAYLOAD)}, read_timeout=READ_TIMEOUT_S, frame_timeout=600
    )
    return frame.payload


async def send_verdict(stream: ByteStream, verdict: Verdict) -> None:
    """Answer an update."""
    await send_frame(stream, "fed.verdict", msgspec.json.encode(verdict))
