"""DHT lookups as walks: one iterative Kademlia walk per key, over streams reused per peer within a lookup.

py-libp2p 0.8.1 opens a fresh stream for every DHT request (a yamux open, two multistream round trips and a newly
signed peer record each time: ~3.6 ms of CPU alone) and its `get_value` / `find_providers` first walk for the
closest peers (FIND_NODE) and only then ask them. Here one walk per key asks GET_VALUE or GET_PROVIDERS directly:
every answer carries closer peers as well, so the walk narrows toward the key while it collects values, and it can
stop as soon as its caller has enough. A `DhtSession` holds one stream per peer for the whole lookup (one request at
a time on it; py-libp2p's server reads requests in a loop until the stream ends), signs the sender's peer record
once, and closes every stream cleanly at the end. Any failure of a request drops (resets) that peer's stream alone
and the walk goes on without it.

Nothing a peer answers is trusted beyond what it can prove: values are checked by the caller, closer peers only
steer the walk, and a reply of the wrong type is a failure. A hostile answer can name anything as closer peers, so:
at most `count` are taken per answer with at most MAX_ADDRS short addresses each, kept by the session (not the
node's peerstore) until the walk asks that peer; a peer that fails is dropped from the walk's candidates, so
unreachable peers made up to look close to the key cannot crowd out the real ones; a walk asks at most MAX_ASKED
peers and remembers at most MAX_KNOWN.
"""

import hashlib
import logging
import math
from collections.abc import Callable, Iterable
from types import TracebackType

import trio
import varint
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE, PROTOCOL_ID
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import maybe_consume_signed_record
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from node.p2p.peerstore_guard import MAX_ADDR_BYTES, MAX_ADDRS, addrs_of

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0  # one request and its answer on one peer's stream
WALK_TIMEOUT_S = 15.0  # a whole walk: peers that answer with far-away or unreachable peers cannot hold it longer
COUNT = 20  # k: the walk ends when the k closest peers it knows have all been asked
ALPHA = 3  # requests in flight per walk: py-libp2p serves 12 inbound DHT streams per node and resets the rest
ADDR_TTL_S = 600  # how long the addresses a peer gives for closer peers are kept, as py-libp2p does
MAX_SENDER_RECORD = 8 * 1024  # an answer's signed peer record (a few addresses: well under 1 KiB)
MAX_ASKED = 4 * COUNT  # peers one walk asks at most
MAX_KNOWN = 8 * COUNT  # candidates one walk keeps (the closest)

# What a caller does with one answer; True when it has enough (the walk stops asking and returns).
OnAnswer = Callable[[ID, Message], bool]


class DhtSession:
    """Requests to DHT peers within one lookup: one stream per peer, reused, one request at a time on each."""

    def __init__(self, dht: KadDHT, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.dht = dht
        self.timeout_s = timeout_s
        self._streams: dict[ID, INetStream] = {}
        self._locks: dict[ID, trio.Lock] = {}
        self._record: bytes | None = None
        self._hints: dict[ID, list[Multiaddr]] = {}  # addresses answers gave for peers, until they are asked
        self._hinted: set[ID] = set()  # peers whose peerstore entry this session made
        self.streams_opened = 0
        self.requests = 0

    async def __aenter__(self) -> "DhtSession":
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def ask(self, peer: ID, request: Message) -> Message | None:
        """`request`'s answer from `peer`, or None (no answer in time, a broken stream, a malformed answer)."""
        lock = self._locks.setdefault(peer, trio.Lock())
        async with lock:
            self.requests += 1
            answer = None
            try:
                with trio.move_on_after(self.timeout_s):
                    answer = await self._exchange(peer, request)
            except Exception as exc:  # any failure is this peer's, for this request
                log.debug("dht %s from %s: %s", Message.MessageType.Name(request.type), peer, exc)
            finally:
                if answer is None:  # failed, timed out or cancelled half-way: the stream's state is unknown
                    await self._drop(peer)
            return answer

    def hint(self, peer: ID, addrs: list[Multiaddr]) -> None:
        """Remember addresses an answer gave for `peer` (the first answer's), to dial it if it is asked."""
        if addrs:
            self._hints.setdefault(peer, addrs)

    async def _exchange(self, peer: ID, request: Message) -> Message | None:
        stream = self._streams.get(peer)
        if stream is None:
            peerstore = self.dht.host.get_peerstore()
            hints = self._hints.get(peer)
            if hints and not addrs_of(peerstore, peer):  # never overwrite what the node knows (or its TTL)
                peerstore.add_addrs(peer, hints, ADDR_TTL_S)
                self._hinted.add(peer)
            stream = await self.dht.host.new_stream(peer, [TProtocol(PROTOCOL_ID)])
            self._streams[peer] = stream
            self.streams_opened += 1
        request.senderRecord = self._sender_record()
        raw = request.SerializeToString()
        await stream.write(varint.encode(len(raw)) + raw)
        answer = Message()
        answer.ParseFromString(await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE))
        if answer.type != request.type:
            raise ValueError(f"answered with message type {answer.type}")
        if len(answer.senderRecord) > MAX_SENDER_RECORD:
            raise ValueError(f"a signed peer record of {len(answer.senderRecord)} bytes")
        if not maybe_consume_signed_record(answer, self.dht.host, peer):
            raise ValueError("the answer's signed peer record is invalid")
        return answer

    def _sender_record(self) -> bytes:
        if self._record is None:
            self._record, _ = env_to_send_in_RPC(self.dht.host)
        return self._record

    async def _drop(self, peer: ID) -> None:
        if peer in self._hinted:  # only an answer vouched for it, and it failed: forget it again
            self._hinted.discard(peer)
            self.dht.host.get_peerstore().clear_peerdata(peer)
        stream = self._streams.pop(peer, None)
        if stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    log.debug("dht: reset failed", exc_info=True)

    async def aclose(self) -> None:
        """Close every stream (the server sees a clean end and closes its side)."""
        streams, self._streams = list(self._streams.values()), {}

        async def close(stream: INetStream) -> None:
            with trio.move_on_after(1):
                try:
                    await stream.close()
                except Exception:
                    log.debug("dht: close failed", exc_info=True)

        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(close, stream)


def distance_to(key: bytes) -> Callable[[ID], int]:
    """The XOR distance of a peer to `key` in the DHT's keyspace (sha256 of both, as py-libp2p sorts)."""
    target = int.from_bytes(hashlib.sha256(key).digest(), "big")

    def distance(peer: ID) -> int:
        return target ^ int.from_bytes(hashlib.sha256(peer.to_bytes()).digest(), "big")

    return distance


def request(kind: int, key: bytes) -> Message:
    """A GET_VALUE / GET_PROVIDERS / FIND_NODE request for `key`."""
    return Message(type=kind, key=key)  # type: ignore[arg-type]  # the enum's values are ints


async def walk(
    session: DhtSession,
    key: bytes,
    kind: int,
    on_answer: OnAnswer,
    count: int = COUNT,
    alpha: int = ALPHA,
) -> set[ID]:
    """Ask the closest peers to `key` that have not been asked, `alpha` at a time, learning closer peers from every
    answer, until the `count` closest known peers that have not failed have all been asked or `on_answer` says it
    has enough (or MAX_ASKED peers were asked, or WALK_TIMEOUT_S passes); the peers that answered. Requests in
    flight when it has enough are answered before it returns (no stream is cut)."""
    dht = session.dht
    me = dht.local_peer_id
    distance = distance_to(key)
    known: dict[ID, int] = {}  # candidate -> its distance to the key

    def consider(peers: Iterable[ID]) -> None:
        for peer in peers:
            if peer != me and peer not in known:
                known[peer] = distance(peer)

    consider(dht.routing_table.find_local_closest_peers(key, count))
    if len(known) < count:  # a young routing table: start from whom we are connected to, then whom we know of
        consider(dht.host.get_connected_peers())
    if len(known) < count:
        peerstore = dht.host.get_peerstore()
        consider(p for p in peerstore.peer_ids() if addrs_of(peerstore, p))
    asked: set[ID] = set()
    answered: set[ID] = set()
    failed: set[ID] = set()
    enough = False
    send, receive = trio.open_memory_channel[tuple[ID, Message | None]](math.inf)

    async def ask(peer: ID) -> None:
        await send.send((peer, await session.ask(peer, request(kind, key))))

    def next_peers(room: int) -> list[ID]:
        if len(asked) >= MAX_ASKED:
            return []
        closest = sorted((p for p in known if p not in failed), key=known.__getitem__)[:count]
        return [p for p in closest if p not in asked][: min(room, MAX_ASKED - len(asked))]

    in_flight = 0
    with trio.move_on_after(WALK_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            while True:
                if not enough:
                    for peer in next_peers(alpha - in_flight):
                        asked.add(peer)
                        in_flight += 1
                        nursery.start_soon(ask, peer)
                if in_flight == 0:
                    break
                peer, answer = await receive.receive()
                in_flight -= 1
                if answer is None:
                    failed.add(peer)
                    continue
                answered.add(peer)
                try:
                    consider(_learn(session, answer, count))
                    if len(known) > MAX_KNOWN:
                        for far in sorted(known, key=known.__getitem__)[MAX_KNOWN:]:
                            del known[far]
                    if not enough and on_answer(peer, answer):
                        enough = True
                except Exception:  # a caller's bug must not end the walk's other requests half-way
                    log.exception("dht walk: an answer from %s could not be used", peer)
    return answered


def _learn(session: DhtSession, answer: Message, count: int) -> list[ID]:
    """The closer peers of `answer` (at most `count`); their addresses (at most MAX_ADDRS each) go to the session."""
    peers = []
    for info in answer.closerPeers[:count]:
        try:
            peer = ID(info.id)
            addrs = [Multiaddr(a) for a in info.addrs[:MAX_ADDRS] if len(a) <= MAX_ADDR_BYTES]
        except Exception:
            continue
        session.hint(peer, addrs)
        peers.append(peer)
    return peers
