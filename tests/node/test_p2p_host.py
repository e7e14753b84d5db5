"""Real libp2p hosts on 127.0.0.1: Noise-only connections, a stable PeerID, framed transfers with ack, refusals."""

import contextlib
import hashlib
import os
import time

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from crypto.identity import Identity
from node.p2p.framing import Frame, FrameTimeout, FrameTruncated, Kind, encode_header, receive_frame, send_frame
from node.p2p.host import Libp2pStream, P2PConfig, P2PError, P2PNode, peer_id_of, tcp_multiaddr

PROTOCOL = "/mirador/test-blob/1"
LIMITS = {"blob": 8 * 2**20}
DEADLINE = 20
# The DHT and gossipsub are covered by their own tests; these start the host alone unless a test needs them.
BARE = P2PConfig(dht=False, pubsub=False, dial_timeout=5, negotiate_timeout=5)


async def wait_for(condition: object, timeout: float = 5) -> None:
    """Poll `condition()` until it is true, within `timeout`."""
    assert callable(condition)
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def port_is_closed(addr: str) -> bool:
    """True if nothing accepts TCP connections at the /ip4/…/tcp/… part of `addr` any more."""
    parts = addr.split("/")
    try:
        stream = await trio.open_tcp_stream(parts[2], int(parts[4]))
    except OSError:
        return True
    await stream.aclose()
    return False


def test_two_hosts_exchange_a_framed_5mb_payload_with_ack() -> None:
    payload = os.urandom(5 * 2**20)
    received: list[Frame] = []
    addrs: list[str] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with P2PNode(Identity.generate()) as sender, P2PNode(Identity.generate()) as receiver:

                async def handler(stream: Libp2pStream) -> None:
                    received.append(await receive_frame(stream, LIMITS, read_timeout=5))

                receiver.set_stream_handler(PROTOCOL, handler)
                addrs.extend(str(a) for a in (*sender.listen_addrs, *receiver.listen_addrs))
                assert all(a.startswith("/ip4/127.0.0.1/tcp/") for a in addrs)
                assert str(receiver.listen_addrs[0]).endswith(f"/p2p/{receiver.peer_id}")

                started = time.perf_counter()
                peer = await sender.connect(receiver.listen_addrs[0])
                connect_s = time.perf_counter() - started
                assert peer == receiver.peer_id
                assert sender.peers() == [receiver.peer_id]
                await wait_for(lambda: receiver.peers() == [sender.peer_id])  # the remote sees the same PeerID

                stream = await sender.open_stream(peer, PROTOCOL)
                started = time.perf_counter()
                await send_frame(stream, "blob", payload, ack_timeout=10)
                transfer_s = time.perf_counter() - started
                await stream.close()
                print(f"connect {connect_s * 1000:.0f} ms; 5 MiB framed+acked {5 / transfer_s:.0f} MiB/s")
        for addr in addrs:
            assert await port_is_closed(addr)

    trio.run(main)
    assert len(received) == 1 and received[0].msg_type == "blob"
    assert hashlib.sha256(received[0].payload).digest() == hashlib.sha256(payload).digest()


def test_peer_id_is_stable_across_restarts() -> None:
    identity = Identity.generate()
    seen = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            for node_identity in (identity, Identity.from_pem(identity.to_pem())):  # as if reloaded from identity.key
                async with trio.open_nursery() as nursery:
                    node = await nursery.start(P2PNode(node_identity, BARE).run)
                    seen.append(node.peer_id)
                    node.stop()

    trio.run(main)
    assert seen[0] == seen[1] == peer_id_of(identity)
    assert seen[0] != peer_id_of(Identity.generate())
    assert str(seen[0]).startswith("12D3KooW")  # an Ed25519 key, inlined in the PeerID


def test_plaintext_only_dialer_cannot_connect() -> None:
    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with P2PNode(Identity.generate(), BARE) as node:
                key_pair = create_new_key_pair()
                plaintext = new_host(
                    key_pair=key_pair,
                    sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
                    muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
                    listen_addrs=[tcp_multiaddr("127.0.0.1", 0)],
                )
                async with plaintext.run(listen_addrs=[tcp_multiaddr("127.0.0.1", 0)]):
                    with trio.fail_after(10), pytest.raises(SwarmException) as refused:
                        await plaintext.connect(info_from_p2p_addr(node.listen_addrs[0]))
                    assert "failed to negotiate the secure protocol" in repr(refused.value.__cause__)
                    with trio.fail_after(10), pytest.raises(P2PError, match="could not connect"):
                        await node.connect(plaintext.get_addrs()[0])  # nor does the node dial down to plaintext
                    assert node.peers() == [] and plaintext.get_connected_peers() == []
                    await plaintext.close()

    trio.run(main)


def test_faulty_senders_over_libp2p() -> None:
    outcomes: list[type[BaseException]] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with P2PNode(Identity.generate(), BARE) as sender, P2PNode(Identity.generate(), BARE) as receiver:

                async def handler(stream: Libp2pStream) -> None:
                    try:
                        await receive_frame(stream, LIMITS, read_timeout=0.5)
                    except (FrameTruncated, FrameTimeout) as exc:
                        outcomes.append(type(exc))

                receiver.set_stream_handler(PROTOCOL, handler)
                peer = await sender.connect(receiver.listen_addrs[0])
                payload = os.urandom(100_000)
                header = encode_header(Kind.DATA, "blob", len(payload), hashlib.sha256(payload).digest())

                died = await sender.open_stream(peer, PROTOCOL)  # the sender dies mid-payload: a clean EOF in libp2p
                await died.write(header + payload[:40_000])
                await died.close()
                await wait_for(lambda: len(outcomes) == 1)

                silent = await sender.open_stream(peer, PROTOCOL)  # the sender stops mid-payload, stream left open
                await silent.write(header + payload[:40_000])
                await wait_for(lambda: len(outcomes) == 2)
                await silent.reset()

    trio.run(main)
    assert outcomes == [FrameTruncated, FrameTimeout]


def test_dht_and_gossipsub_run_before_the_first_dial() -> None:
    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with P2PNode(Identity.generate()) as a, P2PNode(Identity.generate()) as b:
                assert a.pubsub is not None and b.pubsub is not None and a.dht is not None and b.dht is not None
                inbox = await b.pubsub.subscribe("mirador/test")
                await a.pubsub.subscribe("mirador/test")
                await a.connect(b.listen_addrs[0])
                await a.pubsub.wait_for_peer(b.peer_id)
                await wait_for(lambda: b.peer_id in a.pubsub.peer_topics.get("mirador/test", set()))
                await a.pubsub.publish("mirador/test", b"round 1 open")
                with trio.fail_after(5):
                    message = await inbox.get()
                assert message.data == b"round 1 open"
                # the DHT is strict: only namespaces with a validator are stored (libp2p's own public keys here)
                key = f"/pk/{a.peer_id.to_bytes().hex()}"
                with pytest.raises(Exception, match=r"namespace|validator"):
                    await a.dht.put_value("mirador-test", b"value")
                await a.dht.put_value(key, a.key_pair.public_key.serialize())
                assert await b.dht.get_value(key) == a.key_pair.public_key.serialize()

    trio.run(main)


def test_disconnect_also_closes_connections_that_arrive_while_closing() -> None:
    # Arrange: the redialer reconnects within a millisecond of seeing its connection gone, 5 times
    outcome: dict[str, object] = {}

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with P2PNode(Identity.generate(), BARE) as closer, P2PNode(Identity.generate(), BARE) as redialer:

                async def redial(times: int) -> None:
                    for _ in range(times):
                        while closer.peer_id in redialer.peers():
                            await trio.sleep(0.001)
                        with contextlib.suppress(P2PError):
                            await redialer.connect(closer.listen_addrs[0])

                await redialer.connect(closer.listen_addrs[0])
                await wait_for(lambda: redialer.peer_id in closer.peers())
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(redial, 5)
                    # Act
                    outcome["closed"] = await closer.disconnect(redialer.peer_id)
                    nursery.cancel_scope.cancel()  # (a redialer still waiting sees an orphaned connection)

                def views() -> tuple[bool, bool]:
                    return redialer.peer_id in closer.peers(), closer.peer_id in redialer.peers()

                with trio.move_on_after(5):  # both sides see every close; an orphaned connection never converges
                    while views()[0] != views()[1]:
                        await trio.sleep(0.05)
                outcome["closer sees"], outcome["redialer sees"] = views()

    trio.run(main)
    # Assert: redials landed during the close, and no connection is left open on one side and forgotten on the other
    assert isinstance(outcome["closed"], int) and outcome["closed"] >= 2, outcome
    assert outcome["closer sees"] == outcome["redialer sees"], outcome


def test_inbound_slots_come_back_when_connections_close() -> None:
    # Arrange: a node that holds at most 4 inbound connections at once (py-libp2p's inbound cap is max - min)
    small = P2PConfig(dht=False, pubsub=False, dial_timeout=5, negotiate_timeout=5, max_connections=4)
    outcome: dict[str, object] = {"connected": 0}

    async def main() -> None:
        with trio.fail_after(DEADLINE * 2):
            async with P2PNode(Identity.generate(), small) as node:
                target = node.listen_addrs[0]
                # Act: 12 fresh peers, one after the other, each closing its connection before the next
                for _ in range(12):
                    async with P2PNode(Identity.generate(), BARE) as visitor:
                        await visitor.connect(target)
                        outcome["connected"] = int(str(outcome["connected"])) + 1
                await wait_for(lambda: not node.peers())
                # ...then 6 at once: the cap still bounds concurrent connections
                async with contextlib.AsyncExitStack() as stack:
                    at_once = [await stack.enter_async_context(P2PNode(Identity.generate(), BARE)) for _ in range(6)]
                    results = []
                    for visitor in at_once:
                        try:
                            await visitor.connect(target)
                            results.append(True)
                        except P2PError:
                            results.append(False)
                    outcome["at once"] = results

    trio.run(main)
    # Assert: every sequential peer got in (the old code refused every peer after the 4th), and at most 4 at once
    assert outcome["connected"] == 12, outcome
    assert outcome["at once"] == [True] * 4 + [False] * 2, outcome
