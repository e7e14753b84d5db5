"""The node's side of the notice topic: validator, dispatch to handlers, recent notices, paced publishing."""

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import msgspec
import trio
from libp2p.abc import ISubscriptionAPI
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub

from node.p2p.host import P2PNode
from node.p2p.notices.bucket import TokenBucket
from node.p2p.notices.codec import (
    TOPIC,
    Clock,
    Handler,
    N,
    Notice,
    NoticeBacklog,
    NoticeError,
    Sleep,
    decode_notice,
    encode_notice,
)
from node.p2p.notices.guard import NoticeConfig, NoticeStats, PeerGuard, ReceivedNotice, _DropOnConnect

log = logging.getLogger(__name__)


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
        node.on_refusal(self._stream_refused)
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

    def _stream_refused(self, peer: ID, protocol: str, reason: str) -> None:
        """A peer's inbound stream on any protocol was refused: it costs that peer score, as a bad notice does."""
        self.guard.penalize(peer, self.config.stream_refusal_penalty, f"{protocol} {reason}")

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
