"""Framed, acknowledged payloads over an in-memory stream pair: the round trip and every fault a peer can cause."""

import hashlib
import os
from collections.abc import Awaitable, Callable
from enum import Enum

import pytest
import trio
import trio.testing

from node.p2p.framing import (
    HEADER_SIZE,
    ByteStream,
    Frame,
    FrameDigestMismatch,
    FrameError,
    FrameHeaderError,
    FrameRejected,
    FrameTimeout,
    FrameTooLarge,
    FrameTruncated,
    Kind,
    TrioStream,
    decode_header,
    encode_header,
    receive_frame,
    send_frame,
)

LIMITS = {"update": 64 * 1024, "notice": 16}
READ_TIMEOUT = 0.3
TEST_DEADLINE = 5


class CountingStream:
    """A ByteStream that counts the bytes read through it (to show what was refused before reading)."""

    def __init__(self, inner: ByteStream) -> None:
        self.inner = inner
        self.bytes_read = 0

    async def read(self, n: int) -> bytes:
        """Read and count."""
        data = await self.inner.read(n)
        self.bytes_read += len(data)
        return data

    async def write(self, data: bytes) -> None:
        """Write through."""
        await self.inner.write(data)

    async def close(self) -> None:
        """Close through."""
        await self.inner.close()


class Fault(Enum):
    """What a faulty sender does instead of sending one well-formed frame."""

    OVERSIZED = "declares more than the type's maximum"
    TRUNCATED = "closes the stream mid-payload"
    SHORT_HEADER = "closes the stream mid-header"
    WRONG_DIGEST = "sends a payload whose sha256 differs from the header's"
    SILENT = "sends nothing and keeps the stream open"
    STALLS_MID_PAYLOAD = "sends half the payload, then nothing"
    GARBAGE_HEADER = "sends random bytes as a header"
    UNKNOWN_TYPE = "sends a message type the receiver does not accept"
    ACK_AS_DATA = "sends an ACK frame where a DATA frame is expected"


EXPECTED: dict[Fault, type[FrameError]] = {
    Fault.OVERSIZED: FrameTooLarge,
    Fault.TRUNCATED: FrameTruncated,
    Fault.SHORT_HEADER: FrameTruncated,
    Fault.WRONG_DIGEST: FrameDigestMismatch,
    Fault.SILENT: FrameTimeout,
    Fault.STALLS_MID_PAYLOAD: FrameTimeout,
    Fault.GARBAGE_HEADER: FrameHeaderError,
    Fault.UNKNOWN_TYPE: FrameHeaderError,
    Fault.ACK_AS_DATA: FrameHeaderError,
}


async def faulty_send(stream: trio.abc.Stream, fault: Fault, hold: trio.Event) -> None:
    """Act out `fault` on the raw stream; faults that keep the stream open wait on `hold`."""
    payload = os.urandom(1000)
    digest = hashlib.sha256(payload).digest()
    if fault is Fault.OVERSIZED:
        await stream.send_all(encode_header(Kind.DATA, "notice", 10**12, digest) + payload)
        await hold.wait()
    elif fault is Fault.TRUNCATED:
        await stream.send_all(encode_header(Kind.DATA, "update", len(payload), digest) + payload[:500])
        await stream.aclose()
    elif fault is Fault.SHORT_HEADER:
        await stream.send_all(encode_header(Kind.DATA, "update", len(payload), digest)[:10])
        await stream.aclose()
    elif fault is Fault.WRONG_DIGEST:
        await stream.send_all(encode_header(Kind.DATA, "update", len(payload), bytes(32)) + payload)
        await hold.wait()
    elif fault is Fault.SILENT:
        await hold.wait()
    elif fault is Fault.STALLS_MID_PAYLOAD:
        await stream.send_all(encode_header(Kind.DATA, "update", len(payload), digest) + payload[:500])
        await hold.wait()
    elif fault is Fault.GARBAGE_HEADER:
        await stream.send_all(os.urandom(HEADER_SIZE))
        await hold.wait()
    elif fault is Fault.UNKNOWN_TYPE:
        await stream.send_all(encode_header(Kind.DATA, "exploit", len(payload), digest) + payload)
        await hold.wait()
    elif fault is Fault.ACK_AS_DATA:
        await stream.send_all(encode_header(Kind.ACK, "update", 0, digest))
        await hold.wait()


def run_pair(body: Callable[[trio.abc.Stream, trio.abc.Stream], Awaitable[None]]) -> None:
    """Run `body(sender_side, receiver_side)` on a fresh memory stream pair, bounded in time."""

    async def main() -> None:
        left, right = trio.testing.memory_stream_pair()
        with trio.fail_after(TEST_DEADLINE):
            await body(left, right)

    trio.run(main)


def test_round_trip_with_ack() -> None:
    payload = os.urandom(50_000)
    received: list[Frame] = []

    async def body(left: trio.abc.Stream, right: trio.abc.Stream) -> None:
        async def receiver() -> None:
            received.append(await receive_frame(TrioStream(right), LIMITS, read_timeout=READ_TIMEOUT))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await send_frame(TrioStream(left), "update", payload, ack_timeout=READ_TIMEOUT)

    run_pair(body)
    assert received == [Frame("update", payload)]


def test_empty_payload_and_several_frames_on_one_stream() -> None:
    payloads = [b"", b"a", os.urandom(70_000)]
    received: list[bytes] = []

    async def body(left: trio.abc.Stream, right: trio.abc.Stream) -> None:
        async def receiver() -> None:
            for _ in payloads:
                frame = await receive_frame(TrioStream(right), {"update": 100_000}, read_timeout=READ_TIMEOUT)
                received.append(frame.payload)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            for payload in payloads:
                await send_frame(TrioStream(left), "update", payload, ack_timeout=READ_TIMEOUT)

    run_pair(body)
    assert received == payloads


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_receiver_refuses_faulty_sender(fault: Fault) -> None:
    counted: list[CountingStream] = []

    async def body(left: trio.abc.Stream, right: trio.abc.Stream) -> None:
        hold = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(faulty_send, left, fault, hold)
            stream = CountingStream(TrioStream(right))
            counted.append(stream)
            try:
                with pytest.raises(EXPECTED[fault]):
                    await receive_frame(stream, LIMITS, read_timeout=READ_TIMEOUT)
            finally:
                hold.set()

    run_pair(body)
    if fault in (Fault.OVERSIZED, Fault.UNKNOWN_TYPE, Fault.GARBAGE_HEADER):
        assert counted[0].bytes_read == HEADER_SIZE  # refused on the header alone: no payload byte was read


def test_trickling_sender_hits_the_frame_deadline() -> None:
    payload = os.urandom(1000)

    async def body(left: trio.abc.Stream, right: trio.abc.Stream) -> None:
        async def trickle() -> None:
            await left.send_all(encode_header(Kind.DATA, "update", len(payload), hashlib.sha256(payload).digest()))
            for byte in payload:
                await left.send_all(bytes([byte]))
                await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            with pytest.raises(FrameTimeout):
                await receive_frame(TrioStream(right), LIMITS, read_timeout=READ_TIMEOUT, frame_timeout=0.3)
            nursery.cancel_scope.cancel()

    run_pair(body)


def test_sender_learns_why_the_receiver_refused() -> None:
    async def body(left: trio.abc.Stream, right: trio.abc.Stream) -> None:
        async def receiver() -> None:
            with pytest.raises(FrameTooLarge):
                await receive_frame(TrioStream(right), LIMITS, read_timeout=READ_TIMEOUT)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            with pytest.raises(FrameRejected) as refused:
                await send_frame(TrioStream(left), "notice", b"x" * 17, ack_timeout=READ_TIMEOUT)
            assert refused.value.nack is Kind.NACK_TOO_LARGE

    run_pair(body)


def test_sender_times_out_without_an_ack() -> None:
    async def body(left: trio.abc.Stream, right: trio.abc.Stream) -> None:
        with pytest.raises(FrameTimeout):
            await send_frame(TrioStream(left), "update", b"payload", ack_timeout=READ_TIMEOUT)

    run_pair(body)


def test_sender_sees_a_vanished_receiver_as_truncated() -> None:
    async def body(left: trio.abc.Stream, right: trio.abc.Stream) -> None:
        async def receiver() -> None:
            await right.receive_some(10)
            await right.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            with pytest.raises(FrameTruncated):
                await send_frame(TrioStream(left), "update", b"payload", ack_timeout=READ_TIMEOUT)

    run_pair(body)


def test_header_encoding_rules() -> None:
    digest = bytes(range(32))
    header = decode_header(encode_header(Kind.DATA, "update", 2**64 - 1, digest))
    assert (header.kind, header.msg_type, header.length, header.digest) == (Kind.DATA, "update", 2**64 - 1, digest)
    for bad in ("", "x" * 17, "Upper", "sp ace", "é"):
        with pytest.raises(ValueError):
            encode_header(Kind.DATA, bad, 0, digest)
    with pytest.raises(ValueError):
        encode_header(Kind.DATA, "update", 2**64, digest)
    raw = bytearray(encode_header(Kind.DATA, "update", 1, digest))
    raw[5 + 7] = ord("x")  # a character after the NUL padding starts
    with pytest.raises(FrameHeaderError):
        decode_header(bytes(raw))
    with pytest.raises(FrameHeaderError):
        decode_header(b"MRF1" + bytes([99]) + bytes(HEADER_SIZE - 5))
