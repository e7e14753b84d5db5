"""Framed, acknowledged payloads over a byte stream (a libp2p stream or any object with async read/write/close).

One frame = a fixed 61-byte header + the payload:
  magic b"MRF1" (4) | kind (1: DATA, ACK or a NACK reason) | message type (16 bytes ASCII, NUL-padded)
  | payload length (u64, big-endian) | sha256 of the payload (32).
The receiver checks the type and the declared length against its per-type maximum before reading any payload,
puts a deadline on every read, verifies the digest, then answers with an ACK frame (type and digest echoed, no
payload) or, when it refuses the frame, a best-effort NACK naming the reason. The sender waits for the answer with a
deadline. A sender that dies mid-payload shows up as an early end of stream (libp2p reports it as a clean EOF), so the
declared length is what catches it: FrameTruncated. A silent peer raises FrameTimeout.

Streams must return b"" at end of stream; `node.p2p.host.Libp2pStream` adapts libp2p's StreamEOF to that.
"""

import contextlib
import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import trio

from crypto.refusal import Refused, SingleReason

MAGIC = b"MRF1"
TYPE_FIELD_SIZE = 16
DIGEST_SIZE = 32
_HEADER = struct.Struct(f">4sB{TYPE_FIELD_SIZE}sQ{DIGEST_SIZE}s")
HEADER_SIZE = _HEADER.size
READ_CHUNK = 64 * 1024
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_ACK_TIMEOUT = 30.0
_NACK_TIMEOUT = 1.0
_TYPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-/")


class ByteStream(Protocol):
    """What framing needs: read up to n bytes (b"" at the end), write all (ConnectionError once gone), close."""

    async def read(self, n: int) -> bytes:
        """Read up to `n` bytes; b"" once the peer has finished sending."""
        ...

    async def write(self, data: bytes) -> None:
        """Write all of `data`."""
        ...

    async def close(self) -> None:
        """Close the stream."""
        ...


class Kind(IntEnum):
    """The header's kind byte: a data frame, its acknowledgement, or a refusal with its reason."""

    DATA = 1
    ACK = 2
    NACK_TOO_LARGE = 3
    NACK_DIGEST = 4
    NACK_BAD_HEADER = 5


class FrameError(Refused):
    """A frame could not be sent or received (reason: what went wrong, detail: where)."""


class FrameHeaderError(SingleReason, FrameError):
    """The header is not a valid frame header (bad magic, kind or message type, or an unexpected frame)."""

    REASON = "bad_frame"


class FrameTooLarge(SingleReason, FrameError):
    """The declared payload length exceeds the maximum for its message type (refused before reading the payload)."""

    REASON = "too_large"


class FrameTruncated(SingleReason, FrameError):
    """The stream ended before the declared number of bytes arrived (for example the sender died mid-payload)."""

    REASON = "truncated"


class FrameDigestMismatch(SingleReason, FrameError):
    """The payload's sha256 differs from the one in the header."""

    REASON = "bad_digest"


class FrameTimeout(SingleReason, FrameError):
    """The peer sent or accepted nothing within the deadline."""

    REASON = "timeout"


class FrameRejected(FrameError):
    """The receiver refused the frame (its NACK names the reason)."""

    def __init__(self, nack: Kind) -> None:
        super().__init__("rejected", f"the receiver refused the frame: {nack.name}")
        self.nack = nack


@dataclass(frozen=True)
class Header:
    """A decoded frame header."""

    kind: Kind
    msg_type: str
    length: int
    digest: bytes


@dataclass(frozen=True)
class Frame:
    """A received, verified frame."""

    msg_type: str
    payload: bytes


def _check_type(msg_type: str) -> bytes:
    """The message type as its 16-byte field; refuse empty, long or unusual names."""
    if not msg_type or len(msg_type) > TYPE_FIELD_SIZE or not set(msg_type) <= _TYPE_CHARS:
        raise ValueError(f"message type {msg_type!r}: 1-{TYPE_FIELD_SIZE} characters of [a-z0-9._-/] expected")
    return msg_type.encode("ascii").ljust(TYPE_FIELD_SIZE, b"\0")


def encode_header(kind: Kind, msg_type: str, length: int, digest: bytes) -> bytes:
    """Pack a frame header."""
    if not 0 <= length < 2**64 or len(digest) != DIGEST_SIZE:
        raise ValueError("length must fit in a u64 and the digest must be 32 bytes")
    return _HEADER.pack(MAGIC, int(kind), _check_type(msg_type), length, digest)


def decode_header(data: bytes) -> Header:
    """Unpack and check a frame header; FrameHeaderError for anything malformed."""
    if len(data) != HEADER_SIZE:
        raise FrameHeaderError(f"a header is {HEADER_SIZE} bytes, got {len(data)}")
    magic, kind_byte, type_field, length, digest = _HEADER.unpack(data)
    if magic != MAGIC:
        raise FrameHeaderError(f"bad magic {magic!r} (expected {MAGIC!r})")
    try:
        kind = Kind(kind_byte)
    except ValueError:
        raise FrameHeaderError(f"unknown frame kind {kind_byte}") from None
    name, _, padding = type_field.partition(b"\0")
    try:
        msg_type = name.decode("ascii")
        _check_type(msg_type)
    except (UnicodeDecodeError, ValueError):
        raise FrameHeaderError(f"bad message type field {type_field!r}") from None
    if padding.strip(b"\0"):
        raise FrameHeaderError(f"bad message type padding {type_field!r}")
    return Header(kind, msg_type, length, digest)


async def _read_exactly(stream: ByteStream, n: int, read_timeout: float, what: str) -> bytes:
    """Read exactly `n` bytes, each read under `read_timeout`; FrameTruncated if the stream ends first."""
    buf = bytearray()
    while len(buf) < n:
        with trio.move_on_after(read_timeout) as scope:
            chunk = await stream.read(min(n - len(buf), READ_CHUNK))
        if scope.cancelled_caught:
            raise FrameTimeout(f"{what}: nothing received for {read_timeout:g} s ({len(buf)} of {n} bytes read)")
        if not chunk:
            raise FrameTruncated(f"{what}: the stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def _read_payload(stream: ByteStream, header: Header, read_timeout: float) -> bytes:
    """Read the payload announced by `header`, hashing as it arrives; FrameDigestMismatch if it differs."""
    hasher = hashlib.sha256()
    parts: list[bytes] = []
    remaining = header.length
    while remaining:
        chunk = await _read_exactly(stream, min(remaining, READ_CHUNK), read_timeout, f"{header.msg_type} payload")
        hasher.update(chunk)
        parts.append(chunk)
        remaining -= len(chunk)
    if hasher.digest() != header.digest:
        raise FrameDigestMismatch(f"{header.msg_type}: the payload's sha256 differs from the header's")
    return b"".join(parts)


async def _write(stream: ByteStream, data: bytes, write_timeout: float) -> None:
    """Write `data` in chunks, each under `write_timeout`; FrameTimeout if the peer stops reading."""
    view = memoryview(data)
    for start in range(0, len(view), READ_CHUNK * 4):
        try:
            with trio.move_on_after(write_timeout) as scope:
                await stream.write(bytes(view[start : start + READ_CHUNK * 4]))
        except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise FrameTruncated(f"the stream closed while sending ({start} of {len(view)} bytes sent)") from exc
        if scope.cancelled_caught:
            raise FrameTimeout(f"the peer accepted no data for {write_timeout:g} s")


async def _nack(stream: ByteStream, reason: Kind, msg_type: str) -> None:
    """Tell the sender why its frame was refused; best effort (the stream may already be gone)."""
    with trio.move_on_after(_NACK_TIMEOUT), contextlib.suppress(Exception):
        await stream.write(encode_header(reason, msg_type, 0, bytes(DIGEST_SIZE)))


async def send_frame(
    stream: ByteStream,
    msg_type: str,
    payload: bytes,
    *,
    write_timeout: float = DEFAULT_READ_TIMEOUT,
    ack_timeout: float = DEFAULT_ACK_TIMEOUT,
) -> None:
    """Send one DATA frame and wait for its ACK; FrameRejected, FrameTimeout or FrameTruncated on failure."""
    digest = hashlib.sha256(payload).digest()
    await _write(stream, encode_header(Kind.DATA, msg_type, len(payload), digest), write_timeout)
    await _write(stream, payload, write_timeout)
    answer = decode_header(await _read_exactly(stream, HEADER_SIZE, ack_timeout, f"{msg_type} acknowledgement"))
    if answer.kind is Kind.DATA:
        raise FrameHeaderError("expected an acknowledgement, got a data frame")
    if answer.kind is not Kind.ACK:
        raise FrameRejected(answer.kind)
    if answer.msg_type != msg_type or answer.digest != digest or answer.length != 0:
        raise FrameHeaderError("the acknowledgement does not match the frame sent")


async def receive_frame(
    stream: ByteStream,
    max_sizes: Mapping[str, int],
    *,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    frame_timeout: float = math.inf,
) -> Frame:
    """Receive one DATA frame whose type is a key of `max_sizes` (its maximum payload size), verify it and ACK it.

    Every read waits at most `read_timeout`; the whole frame at most `frame_timeout` (a slow trickle is refused too).
    """
    try:
        with trio.fail_after(frame_timeout):
            return await _receive(stream, max_sizes, read_timeout)
    except trio.TooSlowError:
        raise FrameTimeout(f"the frame did not arrive within {frame_timeout:g} s") from None


async def _receive(stream: ByteStream, max_sizes: Mapping[str, int], read_timeout: float) -> Frame:
    """receive_frame without the overall deadline."""
    try:
        header = decode_header(await _read_exactly(stream, HEADER_SIZE, read_timeout, "frame header"))
    except FrameHeaderError:
        await _nack(stream, Kind.NACK_BAD_HEADER, "invalid")
        raise
    if header.kind is not Kind.DATA:
        await _nack(stream, Kind.NACK_BAD_HEADER, header.msg_type)
        raise FrameHeaderError(f"expected a data frame, got {header.kind.name}")
    limit = max_sizes.get(header.msg_type)
    if limit is None:
        await _nack(stream, Kind.NACK_BAD_HEADER, header.msg_type)
        raise FrameHeaderError(f"unexpected message type {header.msg_type!r}")
    if header.length > limit:
        await _nack(stream, Kind.NACK_TOO_LARGE, header.msg_type)
        raise FrameTooLarge(f"{header.msg_type}: {header.length} bytes declared, at most {limit} accepted")
    try:
        payload = await _read_payload(stream, header, read_timeout)
    except FrameDigestMismatch:
        await _nack(stream, Kind.NACK_DIGEST, header.msg_type)
        raise
    await _write(stream, encode_header(Kind.ACK, header.msg_type, 0, header.digest), read_timeout)
    return Frame(header.msg_type, payload)


class TrioStream:
    """A trio stream (TCP, memory) as a ByteStream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def read(self, n: int) -> bytes:
        """Read up to `n` bytes; b"" at the end of the stream."""
        return await self.stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        """Write all of `data`."""
        await self.stream.send_all(data)

    async def close(self) -> None:
        """Close the stream."""
        await self.stream.aclose()
