"""Typed, versioned, rate-limited notices over gossipsub (topic `/mirador/notices/1`), with peer scoring.

A notice is a small msgspec struct, JSON-encoded (at most 4 KiB), in a tagged union on `type` with a version
`v` and the time it was sent (`sent_at`, unix seconds). New notice types are declared with `@notice_type`.

`NoticeBoard` is the node's side of the topic. Its topic validator runs inside py-libp2p's `push_msg`, before a
message is delivered or forwarded, so a refused message goes no further. Per peer (the forwarder that handed us
the message, and its signed originator) it keeps a token bucket and a penalty that recovers with time; a peer
whose score falls below the threshold is blacklisted in pubsub and its connection is closed (again on every
reconnect). Our own notices leave through an outgoing token bucket: `publish` waits for a token, and refuses only
when too many notices are already waiting (`NoticeBacklog`), never dropping one silently.

py-libp2p 0.8.1 behaviour this relies on or works around:
- the validator gets `msg_forwarder` (the direct peer) and the message, whose `from_id` is the signed originator;
  our own publications reach it too, with our own ID as forwarder;
- a message a validator refuses is neither delivered nor forwarded, is not marked seen, and its refusal is cached
  by message ID (from_id + seqno) for 5 minutes, so the same message from another peer is refused unseen;
- gossipsub forwards at most `max_messages_per_topic_per_second` (10) messages per forwarder and topic in any
  one-second window, our own publications included, and drops the rest silently (after local delivery); so the
  outgoing bucket keeps `out_burst + out_rate` under that limit;
- `Pubsub.add_to_blacklist` drops the pubsub stream and ignores the peer's messages, but the connection stays
  up and the peer may reconnect (there is no peer-ID connection gate), so the board closes it, on every connect;
- the router's `PeerScorer` exists, but with its default parameters (all weights 0, thresholds -inf) it gates
  nothing, so the scoring here is our own;
- local delivery goes through a 32-message channel: handlers that fall behind lose notices (logged by libp2p).
"""

import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee, ISubscriptionAPI
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from multiaddr import Multiaddr

from crypto.refusal import Refused
from node.p2p.host import P2PNode

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

    reason: NoticeReason

    def __init__(self, reason: NoticeReason | str, detail: str) -> None:
        super().__init__(NoticeReason(reason), detail)


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
    except (msgspec.MsgspecError, ValueError) as exc:
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


class TokenBucket:
    """`rate` tokens per second up to `burst`, on an injectable monotonic clock; starts full."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._stamp) * self.rate)
        self._stamp = now

    @property
    def tokens(self) -> float:
        """Tokens available now."""
        self._refill()
        return self._tokens

    def try_take(self) -> bool:
        """Take one token if there is one."""
        self._refill()
        if self._tokens < 1 - _EPSILON:
            return False
        self._tokens = max(0.0, self._tokens - 1)
        return True

    def wait_s(self) -> float:
        """Seconds until a token is available (0 if one is)."""
        return max(0.0, (1 - self.tokens) / self.rate)

    async def take(self, sleep: Sleep = trio.sleep) -> None:
        """Wait (with `sleep`) until a token is available, then take it."""
        while not self.try_take():
            await sleep(self.wait_s())


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
        state = self._state(peer, now)
        state.penalty = self._recover(state, now) + self.config.penalties.get(reason, 1.0)
        if -state.penalty < self.config.blacklist_below and peer not in self._blacklisted:
            why = f"score {-state.penalty:.0f} after {reason.value}"
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


class NoticeBoard:
    """One per node: validates, receives, dispatches and publishes notices on `TOPIC`.

    `await board.attach(node)`, then `await nursery.start(board.run)`; `board.on(ArtifactPublished, handler)`
    registers `async handler(notice, origin_peer_id)`. Handlers run one after the other in `run`; keep them
    short (py-libp2p drops local deliveries once 32 wait unread).
    """

    _DROP_QUEUE: ClassVar[int] = 64

    def __init__(
        self,
        config: NoticeConfig | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = trio.sleep,
        wall_clock: Clock = time.time,
    ) -> None:
        self.config = config or NoticeConfig()
        self.guard = PeerGuard(self.config, self._blacklist, clock, wall_clock)
        self._out = TokenBucket(self.config.out_rate, self.config.out_burst, clock)
        self._out_lock = trio.Lock()
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._handlers: dict[type[Notice], list[Callable[[Any, str], Awaitable[None]]]] = {}
        self._recent: deque[ReceivedNotice] = deque(maxlen=self.config.recent)
        self._drop_send, self._drop_recv = trio.open_memory_channel[ID](self._DROP_QUEUE)
        self._node: P2PNode | None = None
        self._pubsub: Pubsub | None = None
        self._sub: ISubscriptionAPI | None = None
        self._pending = 0
        self._published = 0
        self._delivered = 0
        self._handler_errors = 0

    async def attach(self, node: P2PNode) -> None:
        """Register the topic validator (and the reconnect guard) on the node's pubsub, and subscribe."""
        if node.pubsub is None:
            raise ValueError("notices need a node with pubsub enabled")
        if self._pubsub is not None:
            raise RuntimeError("a NoticeBoard attaches to one node, once")
        self._node, self._pubsub = node, node.pubsub
        self._warn_if_pacing_exceeds_router_limit(node)
        node.pubsub.set_topic_validator(TOPIC, self._validate, False)
        if self.config.disconnect_blacklisted:
            node.host.get_network().register_notifee(_DropOnConnect(self.guard.is_blacklisted, self._schedule_drop))
        self._sub = await node.pubsub.subscribe(TOPIC)

    def _warn_if_pacing_exceeds_router_limit(self, node: P2PNode) -> None:
        limit = getattr(node.gossipsub, "max_messages_per_topic_per_second", None)
        if isinstance(limit, int | float) and self.config.out_burst + self.config.out_rate >= limit:
            log.warning(
                "notices: outgoing burst %g + rate %g/s reaches gossipsub's limit of %g per second: "
                "the router may silently drop some of our notices",
                self.config.out_burst,
                self.config.out_rate,
                limit,
            )

    def on(self, kind: type[N], handler: Handler[N]) -> None:
        """Call `await handler(notice, origin_peer_id)` for each received notice of `kind` (or a subclass)."""
        self._handlers.setdefault(kind, []).append(handler)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Receive and dispatch notices (and close blacklisted peers' connections) until cancelled."""
        if self._sub is None:
            raise RuntimeError("attach(node) before run()")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drop_loop)
            task_status.started()
            await self._receive_loop(self._sub)
            nursery.cancel_scope.cancel()

    async def publish(self, notice: Notice) -> None:
        """Stamp, check and publish a notice, waiting for the outgoing rate; NoticeBacklog if too many wait."""
        pubsub = self._require_pubsub()
        now = self._wall_clock()
        data = encode_notice(msgspec.structs.replace(notice, sent_at=int(now)), now)
        if self._pending >= self.config.max_pending:
            raise NoticeBacklog(f"{self._pending} notices already wait to be published")
        self._pending += 1
        try:
            async with self._out_lock:
                await self._out.take(self._sleep)
                await pubsub.publish(TOPIC, data)
        finally:
            self._pending -= 1
        self._published += 1

    def recent(self, kind: type[Notice] | None = None) -> list[ReceivedNotice]:
        """The last notices received (oldest first), optionally only those of `kind`."""
        return [r for r in self._recent if kind is None or isinstance(r.notice, kind)]

    def scores(self) -> dict[str, float]:
        """{peer id: score} of the peers tracked now (0 is best)."""
        return self.guard.scores()

    def blacklisted(self) -> dict[str, str]:
        """{peer id: reason} of the peers this board blacklisted."""
        return self.guard.blacklisted()

    def stats(self) -> NoticeStats:
        """Counters: accepted and refused (by reason) inbound, published, delivered, handler errors."""
        return NoticeStats(
            accepted=self.guard.accepted,
            refused=dict(self.guard.refused),
            published=self._published,
            delivered=self._delivered,
            handler_errors=self._handler_errors,
        )

    @property
    def pending(self) -> int:
        """Our notices waiting for the outgoing rate now."""
        return self._pending

    def _require_pubsub(self) -> Pubsub:
        if self._pubsub is None:
            raise RuntimeError("attach(node) before publishing")
        return self._pubsub

    def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        """The pubsub topic validator (sync): our own messages are only checked, others go through the guard."""
        pubsub = self._require_pubsub()
        try:
            if forwarder == pubsub.my_id:
                return self.guard.check_own(msg.data)
            origin = ID(msg.from_id) if msg.from_id else None
            return self.guard.admit(forwarder, None if origin == pubsub.my_id else origin, msg.data)
        except Exception:  # an exception escaping a validator would end py-libp2p's push_msg task
            log.exception("notices: validator error; message refused")
            return False

    async def _receive_loop(self, sub: ISubscriptionAPI) -> None:
        my_id = self._require_pubsub().my_id
        while True:
            try:
                msg = await sub.get()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            if msg.from_id != my_id.to_bytes():  # our own notices come back through the subscription
                await self._deliver(msg)

    async def _deliver(self, msg: rpc_pb2.Message) -> None:
        try:
            notice = decode_notice(msg.data, self._wall_clock())
        except NoticeError as exc:  # validated a moment ago; only a notice turning stale in between lands here
            log.debug("notices: dropped after validation: %s", exc)
            return
        origin = ID(msg.from_id).to_base58()
        self._recent.append(ReceivedNotice(notice, origin, self._wall_clock()))
        self._delivered += 1
        for kind in type(notice).__mro__:
            for handler in self._handlers.get(kind, []):
                await self._call(handler, notice, origin)

    async def _call(self, handler: Callable[[Any, str], Awaitable[None]], notice: Notice, origin: str) -> None:
        try:
            await handler(notice, origin)
        except Exception:
            self._handler_errors += 1
            log.exception("notices: handler %r failed on %s", handler, type(notice).__name__)

    def _blacklist(self, peer: ID, reason: str) -> None:
        self._require_pubsub().add_to_blacklist(peer)
        if self.config.disconnect_blacklisted:
            self._schedule_drop(peer)

    def _schedule_drop(self, peer: ID) -> None:
        try:
            self._drop_send.send_nowait(peer)
        except trio.WouldBlock:
            log.debug("notices: drop queue full; %s stays blacklisted in pubsub", peer)

    async def _drop_loop(self) -> None:
        assert self._node is not None
        async for peer in self._drop_recv:
            started = trio.current_time()
            with trio.move_on_after(self._node.config.dial_timeout) as scope:
                try:
                    closed = await self._node.disconnect(peer)
                except Exception as exc:
                    log.warning("notices: could not disconnect %s: %s", peer, exc)
                    continue
            if scope.cancelled_caught:
                log.warning("notices: disconnecting %s took over %g s; gave up", peer, self._node.config.dial_timeout)
            elif closed:
                elapsed = trio.current_time() - started
                log.info("notices: closed %d connection(s) of blacklisted peer %s in %.2f s", closed, peer, elapsed)
