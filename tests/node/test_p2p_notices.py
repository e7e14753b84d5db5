"""Gossip notices over real in-process libp2p hosts on 127.0.0.1: relay, refusals, floods, pacing, scoring."""

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID

from crypto.identity import Identity
from marketplace.cid import Cid
from node.market.notices import ArtifactPublished
from node.p2p.host import Libp2pStream, P2PConfig, P2PError, P2PNode, peer_id_of
from node.p2p.notices import (
    MAX_NOTICE_BYTES,
    TOPIC,
    NodeHello,
    Notice,
    NoticeBacklog,
    NoticeBoard,
    NoticeConfig,
    NoticeError,
    NoticeReason,
    PeerGuard,
    TokenBucket,
    decode_notice,
    encode_notice,
)

DEADLINE = 15
# No DHT: its refresh loop would redial the peers a test disconnects, and gossip does not need it.
CFG = P2PConfig(dht=False, dial_timeout=5, negotiate_timeout=5)
FINGERPRINT = Identity.generate().fingerprint
CID = Cid.for_block(b"a signed envelope", codec=0x55).encode()


class FakeClock:
    """A monotonic clock that moves only when told to (or when `sleep` is awaited)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await trio.lowlevel.checkpoint()


async def wait_for(condition: Callable[[], bool], timeout: float = 5) -> None:
    """Poll `condition()` until it is true, within `timeout`."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


@asynccontextmanager
async def network(count: int) -> AsyncIterator[list[P2PNode]]:
    """`count` running nodes (host + gossipsub), stopped on exit."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(P2PNode(Identity.generate(), CFG)) for _ in range(count)]


async def start_board(nursery: trio.Nursery, node: P2PNode, board: NoticeBoard | None = None) -> NoticeBoard:
    """Attach a board to `node` and run it in `nursery`."""
    board = board or NoticeBoard()
    await board.attach(node)
    await nursery.start(board.run)
    return board


async def link(a: P2PNode, b: P2PNode) -> None:
    """Connect a to b and wait until each knows the other's subscription to the notices topic."""
    assert a.pubsub is not None and b.pubsub is not None
    await a.connect(b.listen_addrs[0])
    for node, other in ((a, b), (b, a)):
        assert node.pubsub is not None and other.pubsub is not None
        if TOPIC in other.pubsub.topic_ids:
            await node.pubsub.wait_for_subscription(other.peer_id, TOPIC)


def inbox(board: NoticeBoard) -> list[tuple[Notice, str]]:
    """Every notice the board dispatches, with its origin."""
    got: list[tuple[Notice, str]] = []

    async def handler(notice: Notice, origin: str) -> None:
        got.append((notice, origin))

    board.on(Notice, handler)
    return got


DROP = object()  # a field value meaning "leave the field out"


def _json(body: dict[str, Any], fields: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in {**body, **fields}.items() if v is not DROP}).encode()


def raw(**fields: Any) -> bytes:
    """A hand-built hello notice, sent now, with `fields` overriding, added or (DROP) removed."""
    return _json({"type": "node.hello", "v": 1, "sent_at": int(time.time()), "agent": "raw"}, fields)


def raw_artifact(**fields: Any) -> bytes:
    """A hand-built artifact.published notice, sent now, with `fields` overriding, added or removed."""
    body = {"type": "artifact.published", "v": 1, "sent_at": int(time.time()), "name": "tiny-adapter"}
    body |= {"version": "1.2.0", "kind": "adapter", "publisher": FINGERPRINT, "envelope_cid": CID}
    return _json(body, fields)


def artifact() -> ArtifactPublished:
    """A valid artifact.published notice."""
    return ArtifactPublished(
        name="tiny-adapter", version="1.2.0", kind="adapter", publisher=FINGERPRINT, envelope_cid=CID
    )


# The refusals a hostile peer can provoke, each with the reason the stats count.
MALFORMED: dict[str, tuple[Callable[[], bytes], NoticeReason]] = {
    "oversized": (lambda: raw(agent="a" * 60, pad="x" * MAX_NOTICE_BYTES), NoticeReason.OVERSIZED),
    "not_json": (lambda: b"\xff{not json", NoticeReason.UNDECODABLE),
    "not_an_object": (lambda: b"[1, 2]", NoticeReason.UNDECODABLE),
    "unknown_type": (lambda: raw(type="round.open"), NoticeReason.UNKNOWN_TYPE),
    "wrong_version": (lambda: raw(v=2), NoticeReason.VERSION),
    "version_as_bool": (lambda: raw(v=True), NoticeReason.VERSION),
    "null_version": (lambda: raw(v=None), NoticeReason.VERSION),
    "missing_version": (lambda: raw(v=DROP), NoticeReason.VERSION),
    "missing_sent_at": (lambda: raw(sent_at=DROP), NoticeReason.INVALID),
    "float_sent_at": (lambda: raw(sent_at=time.time()), NoticeReason.INVALID),
    "missing_type": (lambda: raw(type=DROP), NoticeReason.UNDECODABLE),
    "missing_name": (lambda: raw_artifact(name=DROP), NoticeReason.INVALID),
    "unknown_field": (lambda: raw(extra=1), NoticeReason.INVALID),
    "long_agent": (lambda: raw(agent="a" * 65), NoticeReason.INVALID),
    "control_chars": (lambda: raw(agent="evil\nlog line"), NoticeReason.INVALID),
    "bad_cid": (lambda: raw_artifact(envelope_cid="bnot-a-cid"), NoticeReason.INVALID),
    "bad_fingerprint": (lambda: raw_artifact(publisher="ed25519:XYZ"), NoticeReason.INVALID),
    "bad_name": (lambda: raw_artifact(name="../etc"), NoticeReason.INVALID),
    "bad_semver": (lambda: raw_artifact(version="1.2"), NoticeReason.INVALID),
    "bad_kind": (lambda: raw_artifact(kind="dataset"), NoticeReason.INVALID),
    "stale": (lambda: raw(sent_at=int(time.time()) - 7200), NoticeReason.STALE),
    "future": (lambda: raw(sent_at=int(time.time()) + 3600), NoticeReason.FUTURE),
}
OVER_THE_WIRE = ["oversized", "not_json", "unknown_type", "wrong_version", "unknown_field", "bad_cid"]
OVER_THE_WIRE += ["bad_fingerprint", "stale"]


def test_decode_accepts_valid_notices() -> None:
    notice = artifact()
    assert decode_notice(encode_notice(notice)) == notice
    decoded = decode_notice(raw_artifact())
    assert isinstance(decoded, ArtifactPublished) and decoded.name == "tiny-adapter" and decoded.kind == "adapter"
    assert decode_notice(raw(agent=DROP)) == NodeHello(agent="", sent_at=decoded.sent_at)
    assert decode_notice(raw(sent_at=int(time.time()) + 200)).v == 1  # a little clock skew is fine


@pytest.mark.parametrize("case", MALFORMED)
def test_decode_refuses(case: str) -> None:
    make, reason = MALFORMED[case]
    with pytest.raises(NoticeError) as refused:
        decode_notice(make())
    assert refused.value.reason == reason


def test_notice_published_by_a_reaches_c_through_b() -> None:
    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with network(3) as (a, b, c), trio.open_nursery() as nursery:
                board_a, board_b, board_c = [await start_board(nursery, node) for node in (a, b, c)]
                got_c = inbox(board_c)
                await link(a, b)
                await link(b, c)
                assert c.peer_id not in a.peers()

                notice = artifact()
                await board_a.publish(notice)
                await wait_for(lambda: len(got_c) == 1 and len(board_b.recent()) == 1)

                received, origin = got_c[0]
                assert isinstance(received, ArtifactPublished)
                assert (received.name, received.version, received.kind) == ("tiny-adapter", "1.2.0", "adapter")
                assert received.envelope_cid == CID and received.publisher == FINGERPRINT
                assert abs(received.sent_at - time.time()) < 60
                assert origin == a.peer_id.to_base58()
                assert [r.notice for r in board_c.recent()] == [received] == [r.notice for r in board_b.recent()]
                assert board_c.recent(NodeHello) == [] and board_a.recent() == []  # our own are not "received"
                # C saw B as the forwarder and A as the originator: both are accounted, neither penalized.
                assert board_c.scores() == {a.peer_id.to_base58(): 0.0, b.peer_id.to_base58(): 0.0}
                assert board_a.stats().published == 1 and board_c.stats().accepted == 1
                nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.parametrize("case", OVER_THE_WIRE)
def test_malformed_notice_is_refused_and_the_next_valid_one_delivered(case: str) -> None:
    make, reason = MALFORMED[case]
    clock = FakeClock()

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with network(2) as (receiver, hostile), trio.open_nursery() as nursery:
                board = await start_board(nursery, receiver, NoticeBoard(clock=clock))
                got = inbox(board)
                await link(hostile, receiver)
                assert hostile.pubsub is not None
                await hostile.pubsub.publish(TOPIC, make())  # raw pubsub: no NoticeBoard on the hostile side
                await hostile.pubsub.publish(TOPIC, raw(agent="valid"))
                await wait_for(lambda: len(got) == 1 and board.stats().refused.get(reason, 0) == 1)

                assert got == [(NodeHello(agent="valid", sent_at=got[0][0].sent_at), hostile.peer_id.to_base58())]
                stats = board.stats()
                assert stats.refused == {reason: 1} and stats.accepted == 1 and stats.delivered == 1
                assert board.scores() == {hostile.peer_id.to_base58(): -board.config.penalties[reason]}
                assert board.blacklisted() == {}
                nursery.cancel_scope.cancel()

    trio.run(main)


async def drain(node: P2PNode, peer: ID) -> None:
    """Wait a little while node's outbound pubsub queue to `peer` is over a quarter full.

    py-libp2p drops what does not fit in that queue (32 RPCs), so a sender that does not wait floods only itself.
    """
    assert node.pubsub is not None
    with trio.move_on_after(0.5):
        while len(node.pubsub.peer_queues.get(peer, ())) > 8:
            await trio.sleep(0.001)


def test_flooding_peer_is_limited_blacklisted_and_dropped() -> None:
    clock = FakeClock()  # frozen during the flood: the allowance is exactly the burst
    flood = 500

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with network(4) as (receiver, hostile, honest, other), trio.open_nursery() as nursery:
                board = await start_board(nursery, receiver, NoticeBoard(clock=clock))
                honest_board = await start_board(nursery, honest)
                got = inbox(board)
                await link(hostile, receiver)
                await link(honest, receiver)
                assert hostile.pubsub is not None and hostile.gossipsub is not None and receiver.pubsub is not None
                hostile.gossipsub.spam_protection_enabled = False  # a real attacker does not rate-limit itself
                for i in range(flood):
                    await hostile.pubsub.publish(TOPIC, raw(agent=f"flood {i}"))
                    await drain(hostile, receiver.peer_id)

                hostile_id = hostile.peer_id.to_base58()
                await wait_for(lambda: hostile_id in board.blacklisted())
                await wait_for(lambda: hostile.peer_id not in receiver.peers())
                assert receiver.pubsub.is_peer_blacklisted(hostile.peer_id)
                with contextlib.suppress(P2PError):  # coming back does not help: dropped again on connect
                    await hostile.connect(receiver.listen_addrs[0])
                await wait_for(lambda: hostile.peer_id not in receiver.peers())
                assert board.scores()[hostile_id] < board.config.blacklist_below

                await honest_board.publish(NodeHello(agent="honest"))
                await wait_for(lambda: any(origin == honest.peer_id.to_base58() for _, origin in got))
                from_hostile = [notice for notice, origin in got if origin == hostile_id]
                assert 0 < len(from_hostile) <= board.config.peer_burst
                stats = board.stats()
                assert stats.accepted == board.config.peer_burst + 1  # the burst, then the honest notice
                assert stats.refused == {NoticeReason.RATE_LIMITED: 101}  # -1 each: the 101st goes below -100
                assert board.scores()[honest.peer_id.to_base58()] == 0.0

                async def echo(stream: Libp2pStream) -> None:
                    await stream.write(await stream.read(64))

                other.set_stream_handler("/mirador/test-echo/1", echo)
                peer = await receiver.connect(other.listen_addrs[0])  # the host still works
                stream = await receiver.open_stream(peer, "/mirador/test-echo/1")
                await stream.write(b"still here")
                with trio.fail_after(5):
                    assert await stream.read(64) == b"still here"
                await stream.close()
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_outgoing_notices_are_paced_by_the_bucket_and_ours_are_never_rate_limited() -> None:
    clock = FakeClock()
    # Inbound limits far below what we publish: they must not apply to our own notices.
    config = NoticeConfig(peer_rate=0.001, peer_burst=1)
    count = 30

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with network(1) as (node,), trio.open_nursery() as nursery:
                board = await start_board(nursery, node, NoticeBoard(config, clock=clock, sleep=clock.sleep))
                started = clock.now
                for i in range(count):
                    await board.publish(NodeHello(agent=f"n{i}"))
                elapsed = clock.now - started
                allowed = (count - config.out_burst) / config.out_rate
                assert allowed - 1e-6 <= elapsed < allowed + 1 / config.out_rate
                stats = board.stats()
                assert stats.published == count and stats.refused == {}
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_paced_notices_all_arrive_and_take_the_buckets_time() -> None:
    # Real clock, lower bound only: gossipsub itself forwards at most 10 messages per peer and second and drops
    # the rest silently, so every one of these arriving shows the pacing keeps under that limit.
    count = 12
    config = NoticeConfig()

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with network(2) as (sender, receiver), trio.open_nursery() as nursery:
                board_s = await start_board(nursery, sender)
                got = inbox(await start_board(nursery, receiver))
                await link(sender, receiver)
                started = trio.current_time()
                for i in range(count):
                    await board_s.publish(NodeHello(agent=f"n{i}"))
                elapsed = trio.current_time() - started
                await wait_for(lambda: len(got) == count)
                assert elapsed >= (count - config.out_burst) / config.out_rate
                assert sorted(n.agent for n, _ in got if isinstance(n, NodeHello)) == sorted(
                    f"n{i}" for i in range(count)
                )
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_publish_refuses_beyond_max_pending() -> None:
    config = NoticeConfig(out_rate=0.01, out_burst=1, max_pending=2)

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with network(1) as (node,), trio.open_nursery() as nursery:
                board = await start_board(nursery, node, NoticeBoard(config))
                await board.publish(NodeHello())  # the burst
                for _ in range(2):
                    nursery.start_soon(board.publish, NodeHello())
                await wait_for(lambda: board.pending == 2)
                with pytest.raises(NoticeBacklog):
                    await board.publish(NodeHello())
                with pytest.raises(NoticeError, match="invalid"):  # nor does it wait to send a bad notice
                    await board.publish(NodeHello(agent="\x00"))
                assert board.stats().published == 1
                nursery.cancel_scope.cancel()

    trio.run(main)


def peer() -> ID:
    """A fresh PeerID."""
    return peer_id_of(Identity.generate())


def test_score_recovers_with_time_and_blacklists_once() -> None:
    clock = FakeClock()
    dropped: list[tuple[ID, str]] = []
    guard = PeerGuard(NoticeConfig(), lambda p, why: dropped.append((p, why)), clock=clock)
    bad = peer()
    for _ in range(5):
        assert not guard.admit(bad, bad, b"junk")
    assert guard.score(bad) == -50
    clock.advance(30)
    assert guard.score(bad) == -20
    clock.advance(100)
    assert guard.score(bad) == 0 and guard.scores() == {bad.to_base58(): 0.0}
    assert dropped == []

    for _ in range(10):
        guard.admit(bad, bad, b"junk")
    assert guard.score(bad) == -100 and dropped == []  # at the threshold, not below
    for _ in range(3):
        guard.admit(bad, bad, b"junk")
    assert dropped == [(bad, "score -110 after undecodable")]
    assert guard.blacklisted() == {bad.to_base58(): "score -110 after undecodable"}
    assert guard.refused == {"undecodable": 18}


def test_guard_rate_limits_forwarder_and_originator() -> None:
    clock = FakeClock()
    guard = PeerGuard(NoticeConfig(peer_rate=10, peer_burst=20), lambda p, why: None, clock=clock)
    relay, author, other = peer(), peer(), peer()
    assert sum(guard.admit(relay, author, raw()) for _ in range(30)) == 20
    assert guard.score(relay) == guard.score(author) == -10  # both were over
    clock.advance(1)  # 10 tokens back, 1 point recovered
    assert sum(guard.admit(relay, author, raw()) for _ in range(30)) == 10
    assert guard.score(relay) == guard.score(author) == -29
    assert guard.admit(other, other, raw())  # another peer has its own bucket
    assert not guard.admit(relay, other, raw())  # the relay's bucket is empty, whoever the author
    assert (guard.score(relay), guard.score(author), guard.score(other)) == (-30, -29, 0)
    assert guard.accepted == 31 and guard.refused == {"rate_limited": 31}


def test_guard_forgets_idle_peers_beyond_its_bound() -> None:
    clock = FakeClock()
    guard = PeerGuard(NoticeConfig(max_tracked_peers=4), lambda p, why: None, clock=clock)
    peers = [peer() for _ in range(4)]
    for p in peers:
        guard.admit(p, p, raw())
    guard.admit(peers[0], peers[0], b"junk")
    clock.advance(5)  # buckets refilled, peers[0] still penalized
    guard.admit(newcomer := peer(), newcomer, raw())
    assert set(guard.scores()) == {peers[0].to_base58(), newcomer.to_base58()}


def test_token_bucket_on_a_fake_clock() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=5, burst=10, clock=clock)
    assert sum(bucket.try_take() for _ in range(15)) == 10
    assert bucket.wait_s() == pytest.approx(0.2)
    clock.advance(0.5)
    assert bucket.tokens == pytest.approx(2.5)
    clock.advance(100)
    assert bucket.tokens == 10
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)

    async def take_all() -> None:
        for _ in range(20):
            await bucket.take(clock.sleep)

    started = clock.now
    trio.run(take_all)
    assert clock.now - started == pytest.approx((20 - 10) / 5)
