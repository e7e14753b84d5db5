"""The bulk channel (node.market.bulk) over real libp2p hosts and real TCP sockets on 127.0.0.1: fetches over it,
a mixed network with providers that only speak the libp2p block protocol, and attacks on the channel itself
(unknown or guessed tickets, wrong keys, altered, replayed and oversized records, ticket floods)."""

import os
import resource
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import trio

from marketplace.blockstore import BlockStore
from marketplace.cid import Cid
from node.market.block_exchange import BlockServer, fetch_dag
from node.market.bulk import (
    CONTROL_PROTOCOL,
    HELLO,
    MAX_HELLO_FAILURES,
    MAX_PER_PEER,
    MAX_WANT_RECORD,
    READY,
    BulkBusy,
    BulkChannel,
    BulkError,
    BulkServer,
    SealedSocket,
    _connect,
    channel_keys,
    open_channel,
)
from node.p2p.framing import FrameError, receive_frame, send_frame
from node.p2p.host import P2PNode
from tests.node.test_block_exchange import (
    DEADLINE,
    READ_TIMEOUT,
    add_file,
    connect_all,
    exported,
    opener,
    random_file,
    recorder,
    running_nodes,
    stored_blocks,
)


def bulk_opener(client: P2PNode):  # type: ignore[no-untyped-def]
    """open_bulk for fetch_dag: a bulk channel from `client`."""

    async def open_bulk(peer):  # type: ignore[no-untyped-def]
        return await open_channel(client, peer, timeout=5)

    return open_bulk


def serve(node: P2PNode, store: BlockStore, bulk: bool = True) -> BulkServer | None:
    """Serve `store` on `node`: the libp2p block protocol always, the bulk channel unless `bulk` is False (a node
    from before it existed)."""
    BlockServer(store).attach(node)
    if not bulk:
        return None
    server = BulkServer(store, idle_timeout=5)
    server.attach(node)
    return server


def test_a_file_fetched_over_the_bulk_channel_is_whole_and_verified(tmp_path: Path) -> None:
    # Arrange: a 3 MB file (12 raw leaves and a root) on a provider with a bulk channel
    original = random_file(tmp_path / "f.bin", 3 * 10**6, seed=11)
    root = add_file(tmp_path / "provider", tmp_path / "f.bin")
    local = BlockStore(tmp_path / "local")
    seen: list[tuple[int, int]] = []

    async def main() -> tuple[object, BulkServer]:
        with trio.fail_after(DEADLINE):
            async with running_nodes(2) as (provider, client):
                server = serve(provider, BlockStore(tmp_path / "provider"))
                assert server is not None
                peers = await connect_all(client, [provider])
                try:
                    report = await fetch_dag(
                        root, peers, opener(client), local, recorder(seen), open_bulk=bulk_opener(client)
                    )
                finally:
                    server.stop()
                return report, server

    # Act
    report, server = trio.run(main)
    # Assert: every block came over the channel, hashed to its CID; progress reached the whole file
    assert report.channels == {str(p): "bulk" for p in report.served}  # type: ignore[attr-defined]
    assert report.blocks_fetched == 13 and server.blocks_served == 13 and server.channels_served == 1  # type: ignore[attr-defined]
    assert stored_blocks(local) == 13
    assert exported(local, root, tmp_path / "out.bin") == original
    assert seen[-1] == (len(original), len(original))


def test_a_mixed_network_of_old_and_new_providers_and_fetchers_exchanges_files(tmp_path: Path) -> None:
    # Arrange: one provider without a bulk channel (an older node), one with; the same 4 MB file on both, and a
    # second file on the old one only
    original = random_file(tmp_path / "f.bin", 4 * 10**6, seed=12)
    only_old = random_file(tmp_path / "g.bin", 10**6, seed=15)
    root = add_file(tmp_path / "old", tmp_path / "f.bin")
    root_old = add_file(tmp_path / "old", tmp_path / "g.bin")
    add_file(tmp_path / "new", tmp_path / "f.bin")
    fetched_by_new, fetched_by_old = BlockStore(tmp_path / "new-fetcher"), BlockStore(tmp_path / "old-fetcher")

    async def main() -> tuple[object, object, object, list[str]]:
        with trio.fail_after(DEADLINE):
            async with running_nodes(4) as (old, new, new_fetcher, old_fetcher):
                serve(old, BlockStore(tmp_path / "old"), bulk=False)
                server = serve(new, BlockStore(tmp_path / "new"))
                assert server is not None
                peers = await connect_all(new_fetcher, [old, new])
                try:
                    mixed = await fetch_dag(
                        root, peers, opener(new_fetcher), fetched_by_new, batch=2, open_bulk=bulk_opener(new_fetcher)
                    )
                    from_old = await fetch_dag(
                        root_old, peers[:1], opener(new_fetcher), fetched_by_new, open_bulk=bulk_opener(new_fetcher)
                    )
                    # an older fetcher (no bulk channel) from the new provider alone
                    [new_peer] = await connect_all(old_fetcher, [new])
                    plain = await fetch_dag(root, [new_peer], opener(old_fetcher), fetched_by_old)
                finally:
                    server.stop()
                return mixed, from_old, plain, [str(old.peer_id), str(new.peer_id)]

    # Act
    mixed, from_old, plain, (old_id, new_id) = trio.run(main)
    # Assert: each provider was fetched from over what it speaks, none failed, and every file is whole
    assert mixed.channels == {old_id: "libp2p", new_id: "bulk"}  # type: ignore[attr-defined]
    assert sum(mixed.served.values()) == mixed.blocks_fetched == 17 and not mixed.failures  # type: ignore[attr-defined]
    assert from_old.channels == {old_id: "libp2p"} and from_old.served[old_id] == 5  # type: ignore[attr-defined]
    assert plain.channels == {new_id: "libp2p"}  # type: ignore[attr-defined]
    assert exported(fetched_by_new, root, tmp_path / "a.bin") == original
    assert exported(fetched_by_old, root, tmp_path / "b.bin") == original
    assert exported(fetched_by_new, root_old, tmp_path / "c.bin") == only_old


class LyingBulkServer(BulkServer):
    """A fake for a fault a real store cannot produce (it verifies what it reads): it serves every block with its
    first byte flipped, over a genuine channel."""

    def _read(self, cid: Cid) -> bytes | None:
        data = super()._read(cid)
        return None if data is None else bytes([data[0] ^ 1]) + data[1:]


def test_a_provider_lying_over_its_bulk_channel_is_dropped_and_an_honest_one_covers(tmp_path: Path) -> None:
    # Arrange
    original = random_file(tmp_path / "f.bin", 2 * 10**6, seed=13)
    root = add_file(tmp_path / "liar", tmp_path / "f.bin")
    add_file(tmp_path / "honest", tmp_path / "f.bin")
    local = BlockStore(tmp_path / "local")

    async def main() -> tuple[object, str]:
        with trio.fail_after(DEADLINE):
            async with running_nodes(3) as (liar, honest, client):
                BlockServer(BlockStore(tmp_path / "liar")).attach(liar)
                lying = LyingBulkServer(BlockStore(tmp_path / "liar"))
                lying.attach(liar)
                good = serve(honest, BlockStore(tmp_path / "honest"))
                assert good is not None
                peers = await connect_all(client, [liar, honest])
                try:
                    report = await fetch_dag(root, peers, opener(client), local, batch=1, open_bulk=bulk_opener(client))
                finally:
                    lying.stop()
                    good.stop()
                return report, str(liar.peer_id)

    # Act
    report, liar_id = trio.run(main)
    # Assert: the liar's bytes never reached the store; it was dropped with the reason
    assert "do not hash" in report.failures[liar_id]  # type: ignore[attr-defined]
    assert report.served[liar_id] == 0  # type: ignore[attr-defined]
    assert stored_blocks(local) == 9
    assert exported(local, root, tmp_path / "out.bin") == original


# --- the channel under attack (real sockets) ----------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    original = random_file(tmp_path / "f.bin", 300_000, seed=14)
    root = add_file(tmp_path / "store", tmp_path / "f.bin")
    bulk = BulkServer(BlockStore(tmp_path / "store"), idle_timeout=3, hello_timeout=2)
    bulk.start()
    bulk.test_root = root  # type: ignore[attr-defined]
    bulk.test_bytes = original  # type: ignore[attr-defined]
    yield bulk
    bulk.stop()


def connect(server: BulkServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=3)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True if the server closed the connection (EOF or reset) within the socket's timeout."""
    try:
        while chunk := sock.recv(65536):
            del chunk
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def channel(server: BulkServer, session: bytes, key: bytes, ready: bool = False) -> BulkChannel:
    """A connection that sent `session` and a hello sealed under `key` (`ready`: and read the provider's READY)."""
    sock = connect(server)
    send_key, recv_key = channel_keys(key, session)
    sealed = SealedSocket(sock, send_key, recv_key)
    sock.sendall(session + sealed.seal(HELLO))
    if ready:
        assert sealed.recv(len(READY)) == READY
    return BulkChannel(sealed, "test")


def test_a_genuine_ticket_opens_a_channel_that_serves_blocks(server: BulkServer) -> None:
    # Arrange
    session, key = server.issue("peer-a")
    # Act
    ch = channel(server, session, key, ready=True)
    ch.want([server.test_root])  # type: ignore[attr-defined]
    block = ch.answer()
    ch.close()
    # Assert: the root block, verified against its CID
    assert block is not None
    server.test_root.verify(block)  # type: ignore[attr-defined]


def test_an_unknown_session_is_closed_without_an_answer(server: BulkServer) -> None:
    # Arrange: a session id nobody issued, sealed under a key of the attacker's choosing
    session, key = b"\x07" * 16, b"\x09" * 32
    # Act
    ch = channel(server, session, key)
    # Assert
    assert closed_by_server(ch.sealed.sock)
    assert server.channels_served == 0


def test_a_stolen_session_id_without_the_key_is_refused_and_three_tries_end_the_ticket(server: BulkServer) -> None:
    # Arrange: an observer saw the session id on the wire (it travels in clear) but not the key (it crossed Noise)
    session, key = server.issue("peer-a")
    # Act: three hellos under wrong keys, then the genuine one
    for i in range(MAX_HELLO_FAILURES):
        assert closed_by_server(channel(server, session, bytes([i]) * 32).sealed.sock)
    genuine = channel(server, session, key)
    # Assert: the ticket is gone; no channel was ever served
    assert closed_by_server(genuine.sealed.sock)
    assert server.channels_served == 0


def test_a_ticket_opens_one_channel_only(server: BulkServer) -> None:
    # Arrange
    session, key = server.issue("peer-a")
    first = channel(server, session, key, ready=True)
    first.want([server.test_root])  # type: ignore[attr-defined]
    assert first.answer() is not None
    # Act: the same ticket replayed on a second connection
    second = channel(server, session, key)
    # Assert
    assert closed_by_server(second.sealed.sock)
    first.close()


def test_an_expired_ticket_is_refused(tmp_path: Path) -> None:
    # Arrange: a controlled clock
    now = [1000.0]
    bulk = BulkServer(BlockStore(tmp_path / "s"), clock=lambda: now[0], hello_timeout=2)
    bulk.start()
    try:
        session, key = bulk.issue("peer-a")
        now[0] += 31  # past TICKET_TTL_S
        # Act
        ch = channel(bulk, session, key)
        # Assert
        assert closed_by_server(ch.sealed.sock) and bulk.channels_served == 0
    finally:
        bulk.stop()


def test_a_peer_cannot_hoard_tickets(server: BulkServer) -> None:
    # Arrange
    for _ in range(MAX_PER_PEER):
        server.issue("greedy")
    # Act / Assert: the next is refused for that peer only
    with pytest.raises(BulkBusy, match="unused tickets"):
        server.issue("greedy")
    assert server.issue("someone-else")


def test_a_peer_cannot_hold_more_than_its_share_of_channels(server: BulkServer) -> None:
    # Arrange: one peer opens MAX_PER_PEER channels, each with its own ticket (a used ticket no longer counts as one)
    held = [channel(server, *server.issue("greedy"), ready=True) for _ in range(MAX_PER_PEER)]
    # Act / Assert: no more tickets for it while they are open; others still get theirs; one closed frees a place
    with pytest.raises(BulkBusy, match="open channels"):
        server.issue("greedy")
    assert server.issue("someone-else")
    held.pop().close()
    deadline = time.monotonic() + 3
    while True:
        try:
            server.issue("greedy")
            break
        except BulkBusy:
            assert time.monotonic() < deadline, "a closed channel never gave its place back"
            time.sleep(0.05)
    for ch in held:
        ch.close()


def test_an_oversized_record_ends_the_channel_before_anything_is_read(server: BulkServer) -> None:
    # Arrange
    session, key = server.issue("peer-a")
    ch = channel(server, session, key)
    # Act: a 2 GiB length where a want is at most 16 KiB
    ch.sealed.sock.sendall(struct.pack(">I", 2**31))
    # Assert
    started = time.monotonic()
    assert closed_by_server(ch.sealed.sock)
    assert time.monotonic() - started < 2  # refused at once, not after waiting for 2 GiB


def test_altered_replayed_and_reordered_records_do_not_open() -> None:
    # Arrange: both ends of a real socket pair with the channel's keys
    a, b = socket.socketpair()
    a.settimeout(2)
    b.settimeout(2)
    c2s, s2c = channel_keys(b"k" * 32, b"s" * 16)
    sender, receiver = SealedSocket(a, c2s, s2c), SealedSocket(b, s2c, c2s)
    first, second = sender.seal(b"first"), sender.seal(b"second")
    altered = bytearray(sender.seal(b"third"))
    altered[-1] ^= 1
    # Act / Assert: in order they open; a replay, a reordering, an alteration do not
    a.sendall(first)
    assert receiver.recv(64) == b"first"
    a.sendall(first)  # replayed: the receiver expects record 2
    with pytest.raises(BulkError, match="did not open"):
        receiver.recv(64)
    fresh = SealedSocket(b, s2c, c2s)
    a.sendall(second)  # reordered: record 2 where record 1 is expected
    with pytest.raises(BulkError, match="did not open"):
        fresh.recv(64)
    fresh2 = SealedSocket(b, s2c, c2s)
    fresh2._received = 2  # type: ignore[attr-defined]  # positioned for record 3
    a.sendall(bytes(altered))
    with pytest.raises(BulkError, match="did not open"):
        fresh2.recv(64)
    a.close()
    b.close()


def test_garbage_on_the_control_protocol_is_refused_and_tickets_keep_coming(tmp_path: Path) -> None:
    # Arrange
    async def main() -> tuple[BulkServer, bool, dict[str, int]]:
        with trio.fail_after(DEADLINE):
            async with running_nodes(2) as (provider, client):
                server = BulkServer(BlockStore(tmp_path / "s"))
                server.attach(provider)
                [peer] = await connect_all(client, [provider])
                try:
                    stream = await client.open_stream(peer, CONTROL_PROTOCOL)
                    with pytest.raises(FrameError):
                        await send_frame(stream, "bulk.open", b"\xff{not json", write_timeout=2, ack_timeout=2)
                        await receive_frame(stream, {"bulk.ticket": 512}, read_timeout=READ_TIMEOUT)
                    await stream.close()
                    ok = await open_channel(client, peer, timeout=5)
                    ok.close()
                finally:
                    server.stop()
                return server, True, dict(provider.stream_refusals)

    # Act
    server, opened, refusals = trio.run(main)
    # Assert: refused, counted against the peer like a refusal on any other protocol, and the next ticket came
    assert opened and server.channels_refused >= 1
    assert [k for k in refusals if k.startswith(CONTROL_PROTOCOL)] == [f"{CONTROL_PROTOCOL} malformed"]


def test_a_bulk_provider_gone_mid_fetch_is_covered_by_another_and_an_interrupted_fetch_resumes(tmp_path: Path) -> None:
    # Arrange: an 8 MB file (32 leaves) on two bulk providers; the fetcher asks one block per want
    original = random_file(tmp_path / "f.bin", 8 * 2**20, seed=16)
    root = add_file(tmp_path / "a", tmp_path / "f.bin")
    add_file(tmp_path / "b", tmp_path / "f.bin")
    local = BlockStore(tmp_path / "local")

    async def main() -> tuple[int, object, object, str]:
        with trio.fail_after(DEADLINE):
            async with running_nodes(3) as (a, b, client):
                server_a, server_b = serve(a, BlockStore(tmp_path / "a")), serve(b, BlockStore(tmp_path / "b"))
                assert server_a is not None and server_b is not None
                peers = await connect_all(client, [a, b])
                try:
                    # Act 1: the fetch is interrupted (cancelled) once some blocks are in
                    with trio.CancelScope() as scope:

                        def stop_early(done: int, total: int) -> None:
                            if done >= 2 * 2**20:
                                scope.cancel()

                        await fetch_dag(
                            root, peers[:1], opener(client), local, stop_early, batch=1, open_bulk=bulk_opener(client)
                        )
                    kept = stored_blocks(local)
                    # Act 2: fetched again from both; A's server goes away after its first blocks

                    def kill_a(done: int, total: int) -> None:
                        if done >= 4 * 2**20:
                            server_a.stop()

                    report = await fetch_dag(
                        root, peers, opener(client), local, kill_a, batch=1, open_bulk=bulk_opener(client)
                    )
                finally:
                    server_a.stop()
                    server_b.stop()
                return kept, report, scope, str(a.peer_id)

    kept, report, scope, a_id = trio.run(main)
    # Assert: the interrupted fetch kept verified blocks and the second fetched only the rest; B covered for A
    assert scope.cancelled_caught and 0 < kept < 33  # type: ignore[attr-defined]
    assert report.blocks_present == kept and report.blocks_fetched == 33 - kept  # type: ignore[attr-defined]
    assert a_id in report.failures and report.served[a_id] > 0  # type: ignore[attr-defined]
    assert stored_blocks(local) == 33
    assert exported(local, root, tmp_path / "out.bin") == original


@pytest.mark.parametrize("where", ["hello", "want"])
def test_a_trickle_is_cut_off_at_its_deadline_however_often_bytes_come(where: str, tmp_path: Path) -> None:
    # Arrange: a server with 1 s for a hello and for a record's body; a client sending one byte every 0.2 s (each
    # read's own timeout, 3 s, is never reached)
    bulk = BulkServer(BlockStore(tmp_path / "s"), hello_timeout=1, record_timeout=1, idle_timeout=3)
    bulk.start()
    try:
        session, key = bulk.issue("slow")
        sock = connect(bulk)
        send_key, recv_key = channel_keys(key, session)
        sealed = SealedSocket(sock, send_key, recv_key)
        if where == "hello":
            data = session + sealed.seal(HELLO)
        else:
            sock.sendall(session + sealed.seal(HELLO))
            data = sealed.seal(b'{"v":1,"cids":["' + b"b" * 100 + b'"]}')
        # Act: trickle it
        started = time.monotonic()
        cut = False
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = True
                break
            time.sleep(0.2)
            if time.monotonic() - started > 4:
                break
        # Assert: the server closed the connection around its 1 s deadline, long before the bytes ran out
        sock.settimeout(3)
        assert cut or closed_by_server(sock)
        assert time.monotonic() - started < 4
    finally:
        bulk.stop()


class UnreachablePort(BulkServer):
    """A fake for a fault a test cannot set up (a firewall in front of the bulk port): its tickets name a port that
    nothing listens on."""

    @property
    def port(self) -> int:
        with socket.socket() as probe:  # a port that was free a moment ago, closed again
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])


def test_a_provider_whose_bulk_port_cannot_be_reached_is_fetched_from_over_libp2p(tmp_path: Path) -> None:
    # Arrange
    original = random_file(tmp_path / "f.bin", 10**6, seed=17)
    root = add_file(tmp_path / "p", tmp_path / "f.bin")
    local = BlockStore(tmp_path / "local")

    async def main() -> object:
        with trio.fail_after(DEADLINE):
            async with running_nodes(2) as (provider, client):
                BlockServer(BlockStore(tmp_path / "p")).attach(provider)
                server = UnreachablePort(BlockStore(tmp_path / "p"))
                server.attach(provider)
                peers = await connect_all(client, [provider])
                try:
                    return await fetch_dag(root, peers, opener(client), local, open_bulk=bulk_opener(client))
                finally:
                    server.stop()

    # Act
    report = trio.run(main)
    # Assert: served over the libp2p block protocol instead, whole and verified
    assert list(report.channels.values()) == ["libp2p"] and not report.failures  # type: ignore[attr-defined]
    assert exported(local, root, tmp_path / "out.bin") == original


# --- a hostile or busy provider, seen from the fetcher ------------------------------------------------------------


class TricklingProvider:
    """A hostile provider on a real socket: it holds a genuine ticket, opens the channel properly (READY), reads the
    first want, then announces a large answer and sends its bytes one every 0.2 s (for `for_s` at most)."""

    def __init__(self, for_s: float = 10.0) -> None:
        self.session, self.key = b"\x05" * 16, b"\x06" * 32
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.for_s = for_s
        self.trickled = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        sock, _ = self.listener.accept()
        sock.settimeout(5)
        fetcher_to_us, us_to_fetcher = channel_keys(self.key, self.session)
        sealed = SealedSocket(sock, us_to_fetcher, fetcher_to_us)
        try:
            assert sock.recv(16, socket.MSG_WAITALL) == self.session
            assert sealed.recv(len(HELLO)) == HELLO
            sealed.send(READY)
            sealed.recv(MAX_WANT_RECORD)
            sock.sendall(struct.pack(">I", 200_000))  # a block's worth, never completed in time
            ends = time.monotonic() + self.for_s
            while time.monotonic() < ends:
                sock.sendall(b"\x00")
                self.trickled += 1
                time.sleep(0.2)
        except (OSError, BulkError):
            pass  # the fetcher hung up: what we wanted to see
        finally:
            sock.close()
            self.listener.close()

    def channel(self, record_s: float) -> BulkChannel:
        """The fetcher's channel to it (each read waits 3 s at most: a trickle never trips that)."""
        opened = _connect("127.0.0.1", self.port, self.session, self.key, 3.0, 3.0, "trickler")
        opened.record_s = record_s
        return opened


def test_an_answer_trickled_by_a_provider_is_cut_off_at_its_deadline() -> None:
    # Arrange: a channel to a provider that trickles; 1 s for an answer's body
    provider = TricklingProvider()
    ch = provider.channel(record_s=1.0)
    ch.want([Cid.parse("bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy")])
    # Act
    started = time.monotonic()
    with pytest.raises(BulkError, match="by the deadline"):
        ch.answer()
    # Assert: cut at its deadline, although a byte came every 0.2 s (each read's own timeout is 3 s)
    assert time.monotonic() - started < 2.5
    ch.close()


def test_a_cancelled_fetch_does_not_wait_for_a_provider_that_trickles(tmp_path: Path) -> None:
    # Arrange: the only provider trickles its first answer for 10 s; the fetch is cancelled after 1 s
    random_file(tmp_path / "f.bin", 10**6, seed=18)
    root = add_file(tmp_path / "p", tmp_path / "f.bin")
    provider = TricklingProvider(for_s=10.0)

    async def main() -> tuple[float, bool]:
        async with running_nodes(2) as (other, client):
            peers = await connect_all(client, [other])

            async def open_bulk(peer):  # type: ignore[no-untyped-def]
                return provider.channel(record_s=60.0)  # only the cancellation can end this fetch

            started = trio.current_time()
            with trio.move_on_after(1.0) as scope:
                await fetch_dag(root, peers, opener(client), BlockStore(tmp_path / "local"), open_bulk=open_bulk)
            return trio.current_time() - started, scope.cancelled_caught

    # Act
    elapsed, cancelled = trio.run(main)
    # Assert: the fetch ended with its cancel scope, not when the provider stopped trickling; the channel was closed
    assert cancelled and elapsed < 3.0
    time.sleep(0.5)
    assert provider.trickled < 15  # the trickler saw the fetcher hang up, long before its 10 s (50 bytes)


def test_a_provider_whose_channels_are_all_taken_is_fetched_from_over_libp2p(tmp_path: Path) -> None:
    # Arrange: a provider with one channel slot, held by a connection that never says hello (anyone can reach the
    # port); its tickets still come over libp2p
    original = random_file(tmp_path / "f.bin", 10**6, seed=19)
    root = add_file(tmp_path / "p", tmp_path / "f.bin")
    local = BlockStore(tmp_path / "local")

    async def main() -> tuple[object, int]:
        with trio.fail_after(DEADLINE):
            async with running_nodes(2) as (provider, client):
                BlockServer(BlockStore(tmp_path / "p")).attach(provider)
                server = BulkServer(BlockStore(tmp_path / "p"), max_channels=1, hello_timeout=20)
                server.attach(provider)
                squatter = socket.create_connection(("127.0.0.1", server.port), timeout=3)
                peers = await connect_all(client, [provider])
                try:
                    await trio.sleep(0.2)  # the squatter holds the slot
                    report = await fetch_dag(root, peers, opener(client), local, open_bulk=bulk_opener(client))
                finally:
                    squatter.close()
                    server.stop()
                return report, server.channels_served

    # Act
    report, served = trio.run(main)
    # Assert: the provider was not lost: served over the libp2p protocol, whole and verified
    assert list(report.channels.values()) == ["libp2p"] and not report.failures, report  # type: ignore[attr-defined]
    assert served == 0
    assert exported(local, root, tmp_path / "out.bin") == original


def test_a_busy_provider_gives_no_ticket_and_no_blame(tmp_path: Path) -> None:
    # Arrange: a fetcher that already holds MAX_PER_PEER unused tickets (a firewalled port leaves them unused)
    async def main() -> tuple[str, dict[str, int], int]:
        with trio.fail_after(DEADLINE):
            async with running_nodes(2) as (provider, client):
                server = BulkServer(BlockStore(tmp_path / "s"))
                server.attach(provider)
                [peer] = await connect_all(client, [provider])
                try:
                    for _ in range(MAX_PER_PEER):
                        server.issue(str(client.peer_id))
                    # Act
                    with pytest.raises(BulkError) as refused:
                        await open_channel(client, peer, timeout=5)
                finally:
                    server.stop()
                return str(refused.value), dict(provider.stream_refusals), server.busy

    message, refusals, busy = trio.run(main)
    # Assert: no ticket, counted as busy, and nothing scored against the fetcher (it falls back to libp2p)
    assert busy == 1, message
    assert not [k for k in refusals if k.startswith(CONTROL_PROTOCOL)], refusals


def test_the_accept_loop_outlives_running_out_of_file_descriptors(server: BulkServer) -> None:
    # Arrange: a fetcher connects (the kernel completes it in the backlog), then the process runs out of file
    # descriptors while the server accepts (EMFILE)
    session, key = server.issue("peer-a")
    sock = connect(server)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hog: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
        with pytest.raises(OSError):
            while True:
                hog.append(os.open("/dev/null", os.O_RDONLY))
        time.sleep(1.2)  # the accept loop meets EMFILE at least once
    finally:
        for fd in hog:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Act: descriptors are back; the pending connection says hello
    send_key, recv_key = channel_keys(key, session)
    sealed = SealedSocket(sock, send_key, recv_key)
    sock.sendall(session + sealed.seal(HELLO))
    # Assert: it is served (the loop retried instead of ending)
    assert sealed.recv(len(READY)) == READY
    sock.close()
