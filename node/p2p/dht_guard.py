"""Deadlines and a per-peer stream cap in front of py-libp2p's DHT server, which has neither.

py-libp2p 0.8.1 serves `/ipfs/kad/1.0.0` with at most 12 concurrent inbound streams per node and resets every stream
beyond that, but its handler waits for a request's bytes without any deadline. One peer that opens 12 streams and
sends one byte on each (an unfinished length varint) holds all 12 forever: the node then answers nobody's DHT
request, and registry lookups through it fail. `DhtGuard` re-registers the DHT's handler behind:

- a cap of `per_peer` concurrent inbound DHT streams per peer (beyond it, the stream is reset and refused);
- an idle deadline on every read (`idle_s` without the next bytes) and a lifetime deadline per stream
  (`lifetime_s`): an honest client writes its request at once and closes after the answer;
- refusals (`too_many_streams`, `read_timeout`) reported like every other protocol's, so the peer's score pays for
  them and a peer that keeps doing it is blacklisted and disconnected;
- quiet closes: py-libp2p's handler reads requests in a loop until an empty read, but its streams raise StreamEOF
  when the asker closes, which the handler logged as "Failed to read DHT message" and answered with a reset, for
  every honest request. A clean end of stream reads as b"" here, so the handler ends and closes normally.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DhtLimits:
    """How long and how many: per inbound DHT stream, per peer."""

    per_peer: int = 4
    idle_s: float = 5.0
    lifetime_s: float = 30.0


class _DeadlineStream:
    """An INetStream whose reads fail with TooSlowError past the idle or the lifetime deadline (the DHT handler
    then resets the stream, as for any read error)."""

    def __init__(self, stream: INetStream, limits: DhtLimits) -> None:
        self._stream = stream
        self._idle_s = limits.idle_s
        self._ends_at = trio.current_time() + limits.lifetime_s
        self.timed_out = False

    async def read(self, n: int | None = None) -> bytes:
        """Read as the wrapped stream does, within the deadlines."""
        wait = min(self._idle_s, self._ends_at - trio.current_time())
        try:
            with trio.fail_after(max(wait, 0.0)):
                return await self._stream.read(n)
        except trio.TooSlowError:
            self.timed_out = True
            raise
        except EOFError:  # the asker closed its side (StreamEOF); a reset is not an EOFError and still raises
            return b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class DhtGuard:
    """Serves the DHT's protocol through the limits; `refused(protocol, peer, reason)` counts and scores refusals."""

    def __init__(self, dht: KadDHT, refused: Callable[[str, ID, str], None], limits: DhtLimits | None = None) -> None:
        self._dht = dht
        self._refused = refused
        self.limits = limits or DhtLimits()
        self._open: dict[ID, int] = {}

    def install(self, host: IHost) -> None:
        """Replace the DHT's stream handler on `host` with the guarded one."""
        host.set_stream_handler(PROTOCOL_ID, self.handle)

    async def handle(self, stream: INetStream) -> None:
        """Serve one inbound DHT stream within the limits."""
        peer = stream.muxed_conn.peer_id
        if self._open.get(peer, 0) >= self.limits.per_peer:
            await _reset(stream)
            self._refused(PROTOCOL_ID, peer, "too_many_streams")
            return
        self._open[peer] = self._open.get(peer, 0) + 1
        guarded = _DeadlineStream(stream, self.limits)
        try:
            # The backstop: a write to a peer that never reads is not a read, so it is bounded here.
            with trio.move_on_after(self.limits.lifetime_s + self.limits.idle_s) as scope:
                await self._dht.handle_stream(guarded)  # type: ignore[arg-type]  # duck-typed INetStream
            if scope.cancelled_caught:
                guarded.timed_out = True
                await _reset(stream)
        except Exception:
            log.warning("dht: a stream from %s failed; it alone was dropped", peer, exc_info=True)
            await _reset(stream)
        finally:
            left = self._open.get(peer, 1) - 1
            if left > 0:
                self._open[peer] = left
            else:
                self._open.pop(peer, None)
        if guarded.timed_out:
            self._refused(PROTOCOL_ID, peer, "read_timeout")


async def _reset(stream: INetStream) -> None:
    """Reset `stream`, whatever state it is in."""
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception:
            log.debug("dht: reset failed", exc_info=True)
