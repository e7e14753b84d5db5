"""Federation wire structs: update headers, round notices and the aggregator's statement (signed JSON, versioned).

- `UpdateHeader`: a member's update for one round, signed by the member. The payload itself (safetensors bytes or
  serialized CKKS ciphertexts) follows it over a framed stream; the header carries its sha256 and length.
- `RoundOpen` / `RoundDone`: small gossip notices signed by the round's aggregator (the node layer wraps them as
  node notices; federation never imports node). Both fit a 4 KiB notice, so `RoundDone` lists at most 64
  contributors.
- `AggregateStatement`: what the aggregator aggregated (strategy, contributors, sha256 of the aggregate), signed;
  published next to the aggregate.

Members are given as {fingerprint: Ed25519 public key base64}. Signatures follow federation.descriptor's pattern
(canonical JSON without the signature, keys sorted). `choose_aggregator` lives here because verifying a round
notice needs it; federation.round re-exports it.
"""

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Literal, TypeVar

import msgspec

from crypto.identity import Identity
from crypto.refusal import Refused
from crypto.signed import decode_strict, key_fingerprint, sign_struct, signature_valid
from federation.descriptor import (
    Fingerprint,
    Sha256Hex,
    SignatureB64,
    UnixTime,
)
from marketplace.cid import Cid, CidError

UPDATE_SCHEMA = "mirador.fed-update/v1"
ROUND_OPEN_SCHEMA = "mirador.fed-round-open/v1"
ROUND_DONE_SCHEMA = "mirador.fed-round-done/v1"
STATEMENT_SCHEMA = "mirador.fed-aggregate/v1"
MAX_UPDATE_HEADER_BYTES = 2 * 1024
MAX_ROUND_OPEN_BYTES = 2 * 1024
MAX_ROUND_DONE_BYTES = 3584  # leaves room for the node's notice envelope inside its 4 KiB limit
MAX_STATEMENT_BYTES = 64 * 1024
MAX_NOTICE_CONTRIBUTORS = 64
MAX_STATEMENT_CONTRIBUTORS = 1024
MAX_PAYLOAD_LEN = 1 << 34
MAX_ROUND = 1 << 31

Round = Annotated[int, msgspec.Meta(ge=1, le=MAX_ROUND)]
CidText = Annotated[str, msgspec.Meta(max_length=128)]
Kind = Literal["plain", "q8", "ckks"]  # float32 safetensors, 8-bit codes (federation.quantize), CKKS
M = TypeVar("M", bound=msgspec.Struct)


class MessageReason(StrEnum):
    """Why a federation message was refused."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    SCHEMA = "schema"
    WRONG_FEDERATION = "wrong_federation"
    NOT_A_MEMBER = "not_a_member"
    BAD_SIGNATURE = "bad_signature"
    MEMBERS_DIFFER = "members_differ"
    WRONG_AGGREGATOR = "wrong_aggregator"


class MessageError(Refused):
    """A federation message refused: `reason` (a MessageReason) and a detail naming what is wrong."""

    REASONS = MessageReason
    reason: MessageReason


def choose_aggregator(federation_id: str, round: int, members: Sequence[str]) -> str:
    """The round's aggregator: sorted members[int(sha256('<federation_id>:<round>'), 16) % n].

    Every node computes the same choice from the same member set, whatever order it holds them in. The index is a
    hash of the round number, so the role rotates from round to round (about uniformly) and no single node is always
    trusted with the updates; nobody can pick it either, short of controlling the member set.
    """
    ordered = sorted(set(members))
    if not ordered:
        raise ValueError("no members to choose an aggregator from")
    index = int(hashlib.sha256(f"{federation_id}:{round}".encode()).hexdigest(), 16) % len(ordered)
    return ordered[index]


def members_digest(members: Iterable[str]) -> str:
    """Hex sha256 of the sorted, newline-joined member fingerprints: lets nodes see that they agree on membership."""
    return hashlib.sha256("\n".join(sorted(set(members))).encode()).hexdigest()


# --- structs ------------------------------------------------------------------------------------------------------


class UpdateHeader(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One member's update for one round; the payload it describes follows over the stream."""

    schema: str
    federation_id: Sha256Hex
    round: Round
    member: Fingerprint
    layout: Sha256Hex
    kind: Kind
    payload_sha256: Sha256Hex
    payload_len: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAYLOAD_LEN)]
    signature: SignatureB64 = ""


class RoundOpen(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Round `round` is open: send updates to `aggregator` before `deadline` (unix), starting from the global adapter
    applied after round `global_round` (0: the initial adapter), whose CID is `global_cid` ('' under HE, where the
    aggregator never sees the global)."""

    schema: str
    federation_id: Sha256Hex
    round: Round
    aggregator: Fingerprint
    deadline: UnixTime
    global_round: Annotated[int, msgspec.Meta(ge=0, le=MAX_ROUND)] = 0
    global_cid: CidText = ""
    members: Sha256Hex
    signature: SignatureB64 = ""


class RoundDone(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Round `round` is aggregated: the aggregate is at `aggregate_cid`, made of the `contributors`' updates."""

    schema: str
    federation_id: Sha256Hex
    round: Round
    aggregator: Fingerprint
    aggregate_cid: Annotated[str, msgspec.Meta(min_length=2, max_length=128)]
    contributors: Annotated[tuple[Fingerprint, ...], msgspec.Meta(min_length=1, max_length=MAX_NOTICE_CONTRIBUTORS)]
    signature: SignatureB64 = ""


class AggregateStatement(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The aggregator's account of a round: strategy, contributors, the aggregate's sha256 and kind.

    `count` is the total weight of the contributors (each update weighs 1: a member's dataset size is neither
    verifiable nor private, so it is never sent).
    """

    schema: str
    federation_id: Sha256Hex
    round: Round
    aggregator: Fingerprint
    strategy: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    contributors: Annotated[tuple[Fingerprint, ...], msgspec.Meta(min_length=1, max_length=MAX_STATEMENT_CONTRIBUTORS)]
    aggregate_sha256: Sha256Hex
    kind: Kind
    count: Annotated[int, msgspec.Meta(ge=1, le=10**12)]
    signature: SignatureB64 = ""


# --- shared decoding and checking ---------------------------------------------------------------------------------


def _decode(data: bytes, kind: type[M], limit: int, schema: str) -> M:
    return decode_strict(data, kind, limit, schema, MessageError)


def _check_signed(message: msgspec.Struct, signer: str, signature: str, members: Mapping[str, str]) -> None:
    """The signer is a member, its listed key is its own, and the signature is valid."""
    key = members.get(signer)
    if key is None:
        raise MessageError(MessageReason.NOT_A_MEMBER, f"{signer} is not a member of the federation")
    if key_fingerprint(key) != signer:
        raise MessageError(MessageReason.BAD_SIGNATURE, f"the key listed for {signer} is not its own")
    if not signature_valid(key, signature, message):
        raise MessageError(MessageReason.BAD_SIGNATURE, f"{type(message).__name__}: bad signature by {signer}")


def _check_federation(found: str, expected: str) -> None:
    if found != expected:
        raise MessageError(MessageReason.WRONG_FEDERATION, f"for federation {found[:16]}…, not {expected[:16]}…")


def _check_contributors(contributors: Sequence[str], members: Mapping[str, str]) -> None:
    if list(contributors) != sorted(set(contributors)):
        raise MessageError(MessageReason.MALFORMED, "contributors must be sorted and unique")
    if outsiders := [c for c in contributors if c not in members]:
        raise MessageError(
            MessageReason.NOT_A_MEMBER, f"contributors not in the federation: {', '.join(outsiders[:3])}"
        )


def _check_cid(text: str, field: str) -> None:
    try:
        Cid.parse(text)
    except CidError as exc:
        raise MessageError(MessageReason.MALFORMED, f"{field}: {exc}") from None


def _signed(identity: Identity, message: M) -> bytes:
    try:
        return msgspec.json.encode(sign_struct(identity, message))
    except ValueError as exc:
        raise MessageError(MessageReason.MALFORMED, str(exc)) from None


# --- update headers -----------------------------------------------------------------------------------------------


def sign_update_header(
    identity: Identity,
    *,
    federation_id: str,
    round: int,
    layout_digest: str,
    kind: Kind,
    payload: bytes,
) -> bytes:
    """The header (JSON bytes) of `identity`'s update `payload` for `round`, signed by it."""
    header = UpdateHeader(
        schema=UPDATE_SCHEMA,
        federation_id=federation_id,
        round=round,
        member=identity.fingerprint,
        layout=layout_digest,
        kind=kind,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_len=len(payload),
    )
    return _signed(identity, header)


def decode_update_header(data: bytes) -> UpdateHeader:
    """Size, strict decode and schema of an update header (its signature is checked by `check_update_header`)."""
    return _decode(data, UpdateHeader, MAX_UPDATE_HEADER_BYTES, UPDATE_SCHEMA)


def check_update_header(header: UpdateHeader, members: Mapping[str, str]) -> None:
    """Raise MessageError unless the header's member is in `members` and signed it."""
    _check_signed(header, header.member, header.signature, members)


def verify_update_header(data: bytes, members: Mapping[str, str]) -> UpdateHeader:
    """Decode an update header and check that a member signed it; MessageError otherwise."""
    header = decode_update_header(data)
    check_update_header(header, members)
    return header


# --- round notices ------------------------------------------------------------------------------------------------


def sign_round_open(
    identity: Identity,
    *,
    federation_id: str,
    round: int,
    deadline: int,
    global_cid: str,
    members: Iterable[str],
    global_round: int = 0,
) -> bytes:
    """The RoundOpen notice (JSON bytes) of `round`, signed by `identity` as its aggregator."""
    notice = RoundOpen(
        schema=ROUND_OPEN_SCHEMA,
        federation_id=federation_id,
        round=round,
        aggregator=identity.fingerprint,
        deadline=deadline,
        global_round=global_round,
        global_cid=global_cid,
        members=members_digest(members),
    )
    _check_round_open(notice)
    return _signed(identity, notice)


def _check_round_open(notice: RoundOpen) -> None:
    """The global adapter's CID, if any, parses ('' when there is none yet: round 1, or only abandoned rounds); the
    global comes from an earlier round."""
    if notice.global_round >= notice.round:
        detail = f"round {notice.round} cannot start from the global of round {notice.global_round}"
        raise MessageError(MessageReason.MALFORMED, detail)
    if notice.global_cid:
        _check_cid(notice.global_cid, "global_cid")


def verify_round_open(
    data: bytes, federation_id: str, members: Mapping[str, str], candidates: Mapping[str, str] | None = None
) -> RoundOpen:
    """Decode a RoundOpen and check it: this federation, our member set, the right aggregator, its signature.

    `candidates` are the nodes that may aggregate (default: every member; under HE, the aggregator-only nodes).
    """
    notice = _decode(data, RoundOpen, MAX_ROUND_OPEN_BYTES, ROUND_OPEN_SCHEMA)
    _check_federation(notice.federation_id, federation_id)
    _check_round_open(notice)
    if notice.members != members_digest(members):
        raise MessageError(MessageReason.MEMBERS_DIFFER, "the announcer's member set differs from ours")
    _check_aggregator(notice.federation_id, notice.round, notice.aggregator, candidates or members)
    _check_signed(notice, notice.aggregator, notice.signature, members)
    return notice


def _check_aggregator(federation_id: str, round: int, aggregator: str, members: Mapping[str, str]) -> None:
    expected = choose_aggregator(federation_id, round, list(members))
    if aggregator != expected:
        detail = f"round {round} is aggregated by {expected}, not {aggregator}"
        raise MessageError(MessageReason.WRONG_AGGREGATOR, detail)


def sign_round_done(
    identity: Identity, *, federation_id: str, round: int, aggregate_cid: str, contributors: Iterable[str]
) -> bytes:
    """The RoundDone notice (JSON bytes) of `round`, signed by `identity` as its aggregator."""
    _check_cid(aggregate_cid, "aggregate_cid")
    notice = RoundDone(
        schema=ROUND_DONE_SCHEMA,
        federation_id=federation_id,
        round=round,
        aggregator=identity.fingerprint,
        aggregate_cid=aggregate_cid,
        contributors=tuple(sorted(set(contributors))),
    )
    data = _signed(identity, notice)
    if len(data) > MAX_ROUND_DONE_BYTES:
        detail = f"RoundDone is {len(data)} bytes (too many contributors); the limit is {MAX_ROUND_DONE_BYTES}"
        raise MessageError(MessageReason.OVERSIZED, detail)
    return data


def verify_round_done(
    data: bytes, federation_id: str, members: Mapping[str, str], candidates: Mapping[str, str] | None = None
) -> RoundDone:
    """Decode a RoundDone and check it: this federation, the round's aggregator, member contributors, signature."""
    notice = _decode(data, RoundDone, MAX_ROUND_DONE_BYTES, ROUND_DONE_SCHEMA)
    _check_federation(notice.federation_id, federation_id)
    _check_cid(notice.aggregate_cid, "aggregate_cid")
    _check_aggregator(notice.federation_id, notice.round, notice.aggregator, candidates or members)
    _check_signed(notice, notice.aggregator, notice.signature, members)
    _check_contributors(notice.contributors, members)
    return notice


# --- aggregate statement ------------------------------------------------------------------------------------------


def sign_aggregate_statement(
    identity: Identity,
    *,
    federation_id: str,
    round: int,
    strategy: str,
    contributors: Iterable[str],
    aggregate: bytes,
    kind: Kind,
    count: int,
) -> bytes:
    """The statement (JSON bytes) of `identity`'s aggregate of `round`, signed by it."""
    statement = AggregateStatement(
        schema=STATEMENT_SCHEMA,
        federation_id=federation_id,
        round=round,
        aggregator=identity.fingerprint,
        strategy=strategy,
        contributors=tuple(sorted(set(contributors))),
        aggregate_sha256=hashlib.sha256(aggregate).hexdigest(),
        kind=kind,
        count=count,
    )
    _check_count(statement)
    return _signed(identity, statement)


def _check_count(statement: AggregateStatement) -> None:
    if statement.count < len(statement.contributors):
        raise MessageError(
            MessageReason.MALFORMED,
            f"count {statement.count} is below the {len(statement.contributors)} contributors' one example each",
        )


def verify_aggregate_statement(data: bytes, federation_id: str, members: Mapping[str, str]) -> AggregateStatement:
    """Decode an AggregateStatement and check it: this federation, the round's aggregator, signature, contributors."""
    statement = _decode(data, AggregateStatement, MAX_STATEMENT_BYTES, STATEMENT_SCHEMA)
    _check_federation(statement.federation_id, federation_id)
    _check_aggregator(statement.federation_id, statement.round, statement.aggregator, members)
    _check_signed(statement, statement.aggregator, statement.signature, members)
    _check_contributors(statement.contributors, members)
    _check_count(statement)
    return statement
