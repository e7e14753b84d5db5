"""Notices on the wire: the `Notice` base, `@notice_type` registry, strict JSON codec (size, type, version, sent_at
checked before a notice is used), and the refusal reasons."""

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from crypto.refusal import Refused

TOPIC = "/mirador/notices/1"
VERSION = 1
MAX_NOTICE_BYTES = 4096
MAX_FUTURE_S = 300
MAX_AGE_S = 3600
_EPSILON = 1e-9  # token fractions below this count as whole: float refills must not leave 0.9999999 forever
log = logging.getLogger(__name__)

N = TypeVar("N", bound="Notice")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Handler = Callable[[N, str], Awaitable[None]]


class NoticeReason(StrEnum):
    """Why an inbound notice was refused (the keys of `NoticeStats.refused`)."""

    OVERSIZED = "oversized"
    UNDECODABLE = "undecodable"
    UNKNOWN_TYPE = "unknown_type"
    VERSION = "version"
    INVALID = "invalid"
    STALE = "stale"
    FUTURE = "future"
    RATE_LIMITED = "rate_limited"


class NoticeError(Refused):
    """A notice refused: `reason` (a NoticeReason) and a detail for the log."""

    REASONS = NoticeReason
    reason: NoticeReason


class NoticeBacklog(RuntimeError):
    """Too many of our notices already wait for the outgoing rate limit."""


def _unix_now() -> int:
    return int(time.time())


class Notice(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every notice: the protocol version and when it was sent (unix seconds; `publish` restamps it)."""

    v: Literal[1] = 1
    sent_at: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(default_factory=_unix_now)

    def check(self) -> None:
        """Semantic checks beyond the field constraints; raise ValueError naming the field."""


_TYPES: dict[str, type[Notice]] = {}


def notice_type(cls: type[N]) -> type[N]:
    """Class decorator: register a Notice subclass (with a unique `tag`) so that `decode_notice` accepts it."""
    tag = cls.__struct_config__.tag
    if not isinstance(tag, str) or tag in _TYPES:
        raise TypeError(f"{cls.__name__}: a notice type needs a unique string tag (got {tag!r})")
    _TYPES[tag] = cls
    return cls


def notice_types() -> dict[str, type[Notice]]:
    """The registered notice types by tag."""
    return dict(_TYPES)


Agent = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")]


@notice_type
class NodeHello(Notice, tag="node.hello", frozen=True, kw_only=True):
    """A node says hello; `agent` is optional free text (no control characters)."""

    agent: Agent = ""


class _Header(msgspec.Struct):
    """The envelope read before the strict decode: tells an unknown type or version from a bad body, and makes
    `v` and `sent_at` required on the wire (the structs default them only for construction)."""

    type: str
    v: object = None
    sent_at: object = None


_header_decoder = msgspec.json.Decoder(_Header)


@functools.lru_cache(maxsize=4)
def _union_decoder(types: tuple[type[Notice], ...]) -> msgspec.json.Decoder[Any]:
    union: Any = functools.reduce(lambda a, b: a | b, types)  # type: ignore[arg-type,return-value]
    return msgspec.json.Decoder(union)


def decode_notice(data: bytes, now: float | None = None) -> Notice:
    """Decode and check one notice (size, JSON, type, version, fields, semantics, `sent_at` against `now`)."""
    if len(data) > MAX_NOTICE_BYTES:
        raise NoticeError(NoticeReason.OVERSIZED, f"{len(data)} bytes > {MAX_NOTICE_BYTES}")
    header = _decode_header(data)
    if header.type not in _TYPES:
        raise NoticeError(NoticeReason.UNKNOWN_TYPE, f"unknown notice type {header.type[:64]!r}")
    if type(header.v) is not int or header.v != VERSION:
        raise NoticeError(NoticeReason.VERSION, f"unsupported version {str(header.v)[:16]!r} (expected {VERSION})")
    if type(header.sent_at) is not int:
        raise NoticeError(NoticeReason.INVALID, "sent_at: missing or not an integer")
    notice = _decode_body(data)
    _check_sent_at(notice.sent_at, time.time() if now is None else now)
    return notice


def _decode_header(data: bytes) -> _Header:
    try:
        return _header_decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise NoticeError(NoticeReason.UNDECODABLE, f"not a JSON notice: {exc}") from None


def _decode_body(data: bytes) -> Notice:
    try:
        notice: Notice = _union_decoder(tuple(_TYPES.values())).decode(data)
        notice.check()
    except (msgspec.MsgspecError, ValueError, RecursionError) as exc:
        raise NoticeError(NoticeReason.INVALID, str(exc)) from None
    return notice


def _check_sent_at(sent_at: int, now: float) -> None:
    if sent_at > now + MAX_FUTURE_S:
        raise NoticeError(NoticeReason.FUTURE, f"sent_at {sent_at} is {sent_at - now:.0f} s in the future")
    if sent_at < now - MAX_AGE_S:
        raise NoticeError(NoticeReason.STALE, f"sent_at {sent_at} is {now - sent_at:.0f} s old")


def encode_notice(notice: Notice, now: float | None = None) -> bytes:
    """The notice's JSON bytes, checked as a receiver would check them (NoticeError if it would be refused)."""
    data = msgspec.json.encode(notice)
    decode_notice(data, now)
    return data
