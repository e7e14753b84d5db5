"""Inbound protection, independent of the network: per-peer token buckets, penalties that recover with time,
blacklist decisions, and the notifee that closes a blacklisted peer's connections again on every connect."""

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from node.p2p.notices.bucket import TokenBucket
from node.p2p.notices.codec import Clock, Notice, NoticeError, NoticeReason, decode_notice

log = logging.getLogger(__name__)


def _default_penalties() -> dict[NoticeReason, float]:
    return {
        NoticeReason.RATE_LIMITED: 1.0,
        NoticeReason.UNKNOWN_TYPE: 2.0,  # maybe a newer node: cheap
        NoticeReason.VERSION: 2.0,
        NoticeReason.STALE: 5.0,  # maybe a skewed clock
        NoticeReason.FUTURE: 5.0,
        NoticeReason.OVERSIZED: 10.0,
        NoticeReason.UNDECODABLE: 10.0,
        NoticeReason.INVALID: 10.0,
    }


@dataclass(frozen=True)
class NoticeConfig:
    """Inbound limits and scoring, outgoing pacing, memory bounds."""

    peer_rate: float = 10.0  # inbound messages per second per peer (forwarder and originator each)
    peer_burst: float = 20.0
    out_rate: float = 5.0  # ours: out_burst + out_rate must stay under gossipsub's 10 per 1 s window
    out_burst: float = 4.0
    max_pending: int = 64  # our notices waiting for a token; beyond, publish raises NoticeBacklog
    recent: int = 256  # notices kept for recent()
    blacklist_below: float = -100.0
    recovery_per_s: float = 1.0  # score regained per second, up to 0
    penalties: Mapping[NoticeReason, float] = field(default_factory=_default_penalties)
    disconnect_blacklisted: bool = True
    stream_refusal_penalty: float = 10.0  # an inbound stream of any protocol that ended in a refusal or an error
    max_tracked_peers: int = 4096  # idle peers (full bucket, score 0) are forgotten beyond this


@dataclass(frozen=True)
class NoticeStats:
    """Counters since start."""

    accepted: int
    refused: dict[str, int]
    published: int
    delivered: int
    handler_errors: int


@dataclass(frozen=True)
class ReceivedNotice:
    """A notice delivered to this node: who originated it and when it arrived (unix seconds)."""

    notice: Notice
    origin: str
    received_at: float


@dataclass
class _PeerState:
    bucket: TokenBucket
    penalty: float
    stamp: float


class PeerGuard:
    """Inbound protection, independent of the network: per-peer token buckets, scores, blacklist decisions."""

    def __init__(
        self,
        config: NoticeConfig,
        on_blacklist: Callable[[ID, str], None],
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self.config = config
        self._on_blacklist = on_blacklist
        self._clock = clock
        self._wall_clock = wall_clock
        self._peers: dict[ID, _PeerState] = {}
        self._blacklisted: dict[ID, str] = {}
        self.accepted = 0
        self.refused: dict[str, int] = {}

    def admit(self, forwarder: ID, origin: ID | None, data: bytes) -> bool:
        """True if the message may be delivered and forwarded; otherwise count, penalize and maybe blacklist."""
        now = self._clock()
        accountable = [forwarder] if origin is None or origin == forwarder else [forwarder, origin]
        over = [peer for peer in accountable if not self._state(peer, now).bucket.try_take()]
        if over:
            return self._refuse(NoticeReason.RATE_LIMITED, "over the peer's rate", over, now)
        try:
            decode_notice(data, self._wall_clock())
        except NoticeError as exc:
            return self._refuse(exc.reason, exc.detail, accountable, now)
        self.accepted += 1
        return True

    def check_own(self, data: bytes) -> bool:
        """Our own message: checked, never rate limited or scored."""
        try:
            decode_notice(data, self._wall_clock())
        except NoticeError as exc:
            self._count(exc.reason)
            log.warning("notices: refusing our own message (%s)", exc)
            return False
        return True

    def score(self, peer: ID) -> float:
        """The peer's score now (0 is best; it is blacklisted below `blacklist_below`)."""
        state = self._peers.get(peer)
        return 0.0 if state is None else -self._recover(state, self._clock())

    def scores(self) -> dict[str, float]:
        """{peer id: score} of every peer tracked now."""
        return {peer.to_base58(): self.score(peer) for peer in list(self._peers)}

    def blacklisted(self) -> dict[str, str]:
        """{peer id: reason} of the peers blacklisted by this guard."""
        return {peer.to_base58(): reason for peer, reason in self._blacklisted.items()}

    def is_blacklisted(self, peer: ID) -> bool:
        """True if this guard blacklisted `peer`."""
        return peer in self._blacklisted

    def _state(self, peer: ID, now: float) -> _PeerState:
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= self.config.max_tracked_peers:
                self._forget_idle(now)
            bucket = TokenBucket(self.config.peer_rate, self.config.peer_burst, self._clock)
            state = self._peers[peer] = _PeerState(bucket, 0.0, now)
        return state

    def _recover(self, state: _PeerState, now: float) -> float:
        state.penalty = max(0.0, state.penalty - max(0.0, now - state.stamp) * self.config.recovery_per_s)
        state.stamp = now
        return state.penalty

    def _forget_idle(self, now: float) -> None:
        for peer, state in list(self._peers.items()):
            if self._recover(state, now) == 0 and state.bucket.tokens >= state.bucket.burst:
                del self._peers[peer]

    def _refuse(self, reason: NoticeReason, detail: str, peers: list[ID], now: float) -> bool:
        self._count(reason)
        log.debug("notices: refused from %s: %s: %s", ", ".join(map(str, peers)), reason.value, detail)
        for peer in peers:
            self._penalize(peer, reason, now)
        return False

    def _count(self, reason: NoticeReason) -> None:
        self.refused[reason.value] = self.refused.get(reason.value, 0) + 1

    def _penalize(self, peer: ID, reason: NoticeReason, now: float) -> None:
        self.penalize(peer, self.config.penalties.get(reason, 1.0), reason.value, now)

    def penalize(self, peer: ID, points: float, why: str, now: float | None = None) -> None:
        """Lower the peer's score by `points` for `why` (a refused stream, a refused notice); blacklist it below the
        threshold."""
        now = self._clock() if now is None else now
        state = self._state(peer, now)
        state.penalty = self._recover(state, now) + points
        if -state.penalty < self.config.blacklist_below and peer not in self._blacklisted:
            why = f"score {-state.penalty:.0f} after {why}"
            self._blacklisted[peer] = why
            log.warning("notices: blacklisting peer %s (%s)", peer, why)
            self._on_blacklist(peer, why)


class _DropOnConnect(INotifee):
    """Closes again any connection from a blacklisted peer (py-libp2p has no peer-ID connection gate)."""

    def __init__(self, is_blacklisted: Callable[[ID], bool], drop: Callable[[ID], None]) -> None:
        self._is_blacklisted = is_blacklisted
        self._drop = drop

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        """Schedule a disconnect if the peer is blacklisted."""
        peer = conn.muxed_conn.peer_id
        if self._is_blacklisted(peer):
            self._drop(peer)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        """Unused."""

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        """Unused."""

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        """Unused."""

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        """Unused."""

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        """Unused."""
