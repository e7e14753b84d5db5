"""Registry lookups with a hostile DHT peer among real ones (real libp2p hosts on 127.0.0.1).

The liar is a real host that answers every DHT request with what the test gives it: made-up closer peers that look
closer to the key than any real node (unreachable, or with thousands of addresses), made-up providers. Lookups must
still reach the real nodes, keep the node's peerstore bounded, and return the real records.
"""

import os
import socket
import time
from collections.abc import Callable
from contextlib import AsyncExitStack

import trio
import varint
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE, PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerdata import PeerData
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from crypto.identity import Identity
from marketplace.registry_record import record_key
from node.market.registry_dht import DhtRegistry, registry_node
from node.p2p.dht_walk import DhtSession, distance_to, walk
from node.p2p.host import Libp2pStream, P2PConfig, P2PNode
from node.p2p.peerstore_guard import MAX_ADDRS, addrs_of
from tests.node.test_registry_dht import CID_A, CONFIG, DEADLINE, start_line

BARE = P2PConfig(dht=False, pubsub=False, dial_timeout=5, negotiate_timeout=5)
Answer = Callable[[Message], Message]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (a dial is refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def made_up_peer() -> ID:
    """A PeerID of a fresh Ed25519 key that no host runs."""
    return ID.from_pubkey(create_new_key_pair().public_key)


def closer_than(key: bytes, real: list[ID], count: int) -> list[ID]:
    """`count` made-up PeerIDs closer to `key` than every one of `real` (ground: any key is a PeerID)."""
    distance = distance_to(key)
    nearest = min(map(distance, real))
    found: list[ID] = []
    while len(found) < count:
        peer = ID(b"\x00\x24\x08\x01\x12\x20" + os.urandom(32))  # an identity multihash of an Ed25519 key
        if distance(peer) < nearest:
            found.append(peer)
    return found


def peer_entry(peer: ID, addrs: list[str]) -> Message.Peer:
    return Message.Peer(id=peer.to_bytes(), addrs=[Multiaddr(a).to_bytes() for a in addrs])


async def liar(nursery: trio.Nursery, stack: AsyncExitStack, answer: Answer) -> P2PNode:
    """A running host that answers every DHT request on a stream with `answer(request)`."""
    node = P2PNode(Identity.generate(), BARE)
    await nursery.start(node.run)
    stack.callback(node.stop)

    async def handle(stream: Libp2pStream) -> None:
        while True:
            request = Message()
            request.ParseFromString(await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE))
            reply = answer(request)
            reply.type = request.type
            raw = reply.SerializeToString()
            await stream.write(varint.encode(len(raw)) + raw)

    node.set_stream_handler(PROTOCOL_ID, handle)
    return node


async def honest_network(
    stack: AsyncExitStack, nursery: trio.Nursery, name: str
) -> tuple[list[tuple[P2PNode, DhtRegistry]], str]:
    """Four registry nodes that know each other; the last publishes `name`. The nodes and its record key."""
    nodes = await start_line(stack, nursery, 4)
    publisher = nodes[-1][1]
    await publisher.announce(name, {"1.0.0": CID_A})
    return nodes, record_key(name, publisher.identity.fingerprint)


async def newcomer(stack: AsyncExitStack, nursery: trio.Nursery, *peers: P2PNode) -> tuple[P2PNode, DhtRegistry]:
    """A registry node that has dialled `peers` and knows nobody else yet."""
    node, registry = registry_node(Identity.generate(), CONFIG)
    await nursery.start(node.run)
    stack.callback(node.stop)
    for peer in peers:
        await node.connect(peer.listen_addrs[0])
    return node, registry


def test_unreachable_peers_made_up_to_look_closest_do_not_hide_the_real_ones() -> None:
    # Arrange: a newcomer knows the liar and one honest node; the liar answers with 20 unreachable peers closer to
    # the record key than every real node (they would fill the walk's 20 closest and end it)
    asked: set[ID] = set()
    honest: list[ID] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                nodes, key = await honest_network(stack, nursery, "tiny-model")
                honest.extend(node.peer_id for node, _ in nodes)
                port = closed_port()
                fakes = closer_than(key.encode(), honest, 20)
                entries = [peer_entry(p, [f"/ip4/127.0.0.1/tcp/{port}"]) for p in fakes]
                bad = await liar(nursery, stack, lambda _: Message(closerPeers=entries))
                node, _ = await newcomer(stack, nursery, bad, nodes[0][0])
                assert node.dht is not None
                # Act: an exhaustive walk toward the record key
                async with DhtSession(node.dht) as session:
                    asked.update(await walk(session, key.encode(), Message.MessageType.GET_VALUE, lambda p, a: False))
                nursery.cancel_scope.cancel()

    trio.run(main)
    # Assert: every real node was asked (and answered), the made-up ones failed and dropped out of the walk
    assert set(honest) <= asked, (len(set(honest) & asked), len(honest))


def test_thousands_of_addresses_for_one_closer_peer_stay_out_of_the_peerstore() -> None:
    # Arrange: the liar names one made-up peer with 5,000 addresses (py-libp2p's own walks add what answers give
    # to the peerstore too, each address after a scan of those before)
    kept: dict[str, object] = {}

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                nodes, _ = await honest_network(stack, nursery, "tiny-model")
                fake = made_up_peer()
                port = closed_port()
                bomb = peer_entry(fake, [f"/ip4/10.{i // 250}.{i % 250}.1/tcp/{port}" for i in range(5000)])
                bad = await liar(nursery, stack, lambda _: Message(closerPeers=[bomb]))
                node, registry = await newcomer(stack, nursery, bad, nodes[0][0])
                # Act
                started = time.monotonic()
                records = await registry.lookup("tiny-model")
                kept["seconds"] = time.monotonic() - started
                kept["fake"] = addrs_of(node.host.get_peerstore(), fake)
                kept["found"] = len(records)
                nursery.cancel_scope.cancel()

    trio.run(main)
    # Assert: at most MAX_ADDRS of them ever reached the peerstore, and the record was found
    assert len(kept["fake"]) <= MAX_ADDRS  # type: ignore[arg-type]
    assert kept["found"] == 1 and kept["seconds"] < 10, kept


def test_the_peerstore_guard_keeps_permanent_entries_and_the_node_s_own() -> None:
    # Arrange: a host's peerstore (guarded by make_host), a permanent entry for a peer we dialled
    node = P2PNode(Identity.generate(), BARE)
    peerstore = node.host.get_peerstore()
    friend = made_up_peer()
    peerstore.add_addrs(friend, [Multiaddr("/ip4/127.0.0.1/tcp/4001")], 0)
    # Act: what a hostile answer would make the library do
    peerstore.add_addrs(friend, [Multiaddr(f"/ip4/10.0.0.{i}/tcp/1") for i in range(50)], 600)
    peerstore.add_addrs(node.peer_id, [Multiaddr("/ip4/10.9.9.9/tcp/9")], 600)
    # Assert: the friend stays permanent with at most MAX_ADDRS addresses; nothing was added for ourselves
    assert peerstore.peer_data_map[friend].get_ttl() == 0  # type: ignore[attr-defined]
    assert len(peerstore.addrs(friend)) == MAX_ADDRS
    assert not peerstore.peer_data_map[node.peer_id].get_addrs()  # type: ignore[attr-defined]


def test_a_full_peerstore_never_evicts_the_node_s_own_key_pair() -> None:
    # Arrange: a host's peerstore filled past its limit with peers that have addresses (entries without any, like
    # the node's own, are evicted first)
    node = P2PNode(Identity.generate(), BARE)
    peerstore = node.host.get_peerstore()
    peerstore.max_peers = 10  # type: ignore[attr-defined]
    for i in range(20):
        data = peerstore.peer_data_map.setdefault(made_up_peer(), PeerData())  # type: ignore[attr-defined]
        data.add_addrs([Multiaddr(f"/ip4/10.0.0.{i}/tcp/1")])
    # Act
    peerstore._enforce_peer_limit()  # type: ignore[attr-defined]
    # Assert: the store is back to its limit and still holds our key pair
    assert len(peerstore.peer_data_map) <= 11  # type: ignore[attr-defined]
    assert peerstore.privkey(node.peer_id) is not None


def test_an_expired_peerstore_entry_does_not_break_a_walk() -> None:
    # Arrange: a newcomer with one peer, and an entry for another whose addresses expired (py-libp2p raises
    # PeerStoreError when an expired entry's addresses are asked for)
    records: list[object] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                nodes, _ = await honest_network(stack, nursery, "tiny-model")
                node, registry = await newcomer(stack, nursery, nodes[0][0])
                node.host.get_peerstore().add_addrs(made_up_peer(), [Multiaddr("/ip4/10.1.1.1/tcp/1")], 1)
                await trio.sleep(2.5)  # is_expired compares whole seconds
                # Act
                records.extend(await registry.lookup("tiny-model"))
                nursery.cancel_scope.cancel()

    trio.run(main)
    # Assert
    assert len(records) == 1


def test_made_up_publishers_from_one_peer_do_not_crowd_out_the_real_one() -> None:
    # Arrange: the newcomer knows only the liar, which lists 64 made-up publishers of the name (real Ed25519
    # PeerIDs, no records) and one real node as a closer peer
    publishers: set[str] = set()
    real_publisher: list[str] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                nodes, _ = await honest_network(stack, nursery, "tiny-model")
                real_publisher.append(nodes[-1][1].identity.fingerprint)
                first = nodes[0][0]
                fakes = [peer_entry(made_up_peer(), ["/ip4/10.2.2.2/tcp/2"]) for _ in range(64)]
                closer = [peer_entry(first.peer_id, [str(first.listen_addrs[0])])]
                bad = await liar(nursery, stack, lambda _: Message(providerPeers=fakes, closerPeers=closer))
                _, registry = await newcomer(stack, nursery, bad)
                # Act
                publishers.update(r.record.publisher for r in await registry.lookup("tiny-model"))
                nursery.cancel_scope.cancel()

    trio.run(main)
    # Assert: the real publisher's record was found through the real node the liar had to name
    assert publishers == set(real_publisher)


def test_a_lookup_keeps_the_newest_record_it_found_as_this_node_s_floor() -> None:
    # Arrange
    kept: list[bytes | None] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                nodes, key = await honest_network(stack, nursery, "tiny-model")
                node, registry = await newcomer(stack, nursery, nodes[0][0])
                assert node.dht is not None
                before = node.dht.value_store.get(key.encode())
                # Act
                [found] = await registry.lookup("tiny-model")
                after = node.dht.value_store.get(key.encode())
                kept.extend([before.value if before else None, after.value if after else None, found.raw])
                nursery.cancel_scope.cancel()

    trio.run(main)
    # Assert: the newcomer held nothing before; now it holds the record it found, so a later walk that meets only
    # older (still valid) copies compares them with it and cannot roll it back
    before, after, found = kept
    assert before is None and after == found
