"""Block exchange over real in-process libp2p hosts on 127.0.0.1: fetches, parallel providers, faulty providers
that another provider covers for, resumes, and a server that refuses malformed wants and keeps serving."""

import base64
import hashlib
import random
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from enum import Enum
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID

from crypto.identity import Identity
from marketplace.blockstore import BlockStore
from marketplace.cid import DAG_PB, RAW, Cid, multihash_sha256
from marketplace.content_store import EmbeddedStore
from marketplace.unixfs import CHUNK_SIZE, Profile, decode_pbnode, encode_file_node
from node.market.block_exchange import (
    ANSWER_LIMITS,
    BLOCK,
    BLOCK_NONE,
    MAX_CIDS,
    PROTOCOL,
    WANT,
    WANT_LIMITS,
    BlockServer,
    FetchError,
    FetchReport,
    decode_want,
    encode_want,
    fetch_dag,
)
from node.p2p.framing import ByteStream, FrameError, FrameRejected, FrameTruncated, Kind, receive_frame, send_frame
from node.p2p.host import Libp2pStream, P2PConfig, P2PNode

DEADLINE = 15
READ_TIMEOUT = 1.0  # short, so that a silent provider costs one second
BARE = P2PConfig(dht=False, pubsub=False, dial_timeout=5, negotiate_timeout=5)


def random_file(path: Path, size: int, seed: int) -> bytes:
    """Write `size` seeded random bytes to `path` and return them."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def add_file(folder: Path, data_path: Path, profile: Profile = "v1-raw") -> Cid:
    """Import a file into the block store under `folder`; its root CID."""
    return Cid.parse(EmbeddedStore(folder).add(data_path, profile).cid)


def stored_blocks(store: BlockStore) -> int:
    """Assert that every block in the store re-hashes to its CID and no temp file is left; how many there are."""
    count = 0
    for path in store.root.rglob("*"):
        if path.is_dir():
            continue
        assert path.suffix == ".data", f"leftover file {path}"
        multihash = base64.b32decode(path.stem + "=" * (-len(path.stem) % 8))
        assert hashlib.sha256(path.read_bytes()).digest() == multihash[2:], f"unverified block {path}"
        count += 1
    return count


def leaves_of(store: BlockStore, root: Cid) -> list[Cid]:
    """The leaf CIDs of a two-level file DAG, in file order."""
    return [link.cid for link in decode_pbnode(store.get(root)).links]


def exported(store: BlockStore, root: Cid, dest: Path) -> bytes:
    """The file of `root` as exported from `store`."""
    store.export(root, dest)
    return dest.read_bytes()


@asynccontextmanager
async def running_nodes(count: int) -> AsyncIterator[list[P2PNode]]:
    """`count` bare P2P nodes running in a nursery; all stopped on the way out."""
    async with trio.open_nursery() as nursery:
        nodes: list[P2PNode] = [await nursery.start(P2PNode(Identity.generate(), BARE).run) for _ in range(count)]
        try:
            yield nodes
        finally:
            for node in nodes:
                node.stop()


async def connect_all(client: P2PNode, providers: list[P2PNode]) -> list[ID]:
    """Dial every provider from `client`; their peer IDs."""
    return [await client.connect(node.listen_addrs[0]) for node in providers]


def recorder(calls: list[tuple[int, int]]) -> Callable[[int, int], None]:
    """A progress callback that appends each (done, total) to `calls`."""
    return lambda done, total: calls.append((done, total))


def opener(client: P2PNode) -> Callable[[ID], Awaitable[ByteStream]]:
    """open_stream for fetch_dag: a block-exchange stream from `client`."""

    async def open_stream(peer: ID) -> ByteStream:
        return await client.open_stream(peer, PROTOCOL)

    return open_stream


def test_fetch_v1_raw_and_v0_files_from_one_provider(tmp_path: Path) -> None:
    originals = {
        "v1-raw": random_file(tmp_path / "raw.bin", 3 * 10**6, seed=1),
        "v0": random_file(tmp_path / "v0.bin", 10**6, seed=2),
    }
    roots = {
        "v1-raw": add_file(tmp_path / "provider", tmp_path / "raw.bin", "v1-raw"),
        "v0": add_file(tmp_path / "provider", tmp_path / "v0.bin", "v0"),
    }
    local = BlockStore(tmp_path / "local")
    reports: dict[str, FetchReport] = {}
    seen: dict[str, list[tuple[int, int]]] = {"v1-raw": [], "v0": []}

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with running_nodes(2) as (provider, client):
                BlockServer(BlockStore(tmp_path / "provider")).attach(provider)
                peers = await connect_all(client, [provider])
                for profile, root in roots.items():
                    reports[profile] = await fetch_dag(root, peers, opener(client), local, recorder(seen[profile]))

    trio.run(main)
    for profile, data in originals.items():
        assert exported(local, roots[profile], tmp_path / f"out-{profile}") == data
        report = reports[profile]
        assert report.total_bytes == len(data) and report.blocks_present == 0 and not report.failures
        assert report.blocks_fetched == -(-len(data) // CHUNK_SIZE) + 1  # leaves + root
        assert seen[profile][-1] == (len(data), len(data))
        assert [d for d, _ in seen[profile]] == sorted(d for d, _ in seen[profile])
    assert stored_blocks(local) == sum(r.blocks_fetched for r in reports.values())


def test_two_providers_both_serve(tmp_path: Path) -> None:
    data = random_file(tmp_path / "file.bin", 4 * CHUNK_SIZE + 1234, seed=3)
    root = add_file(tmp_path / "a", tmp_path / "file.bin")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    local = BlockStore(tmp_path / "local")
    reports: list[FetchReport] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with running_nodes(3) as (a, b, client):
                BlockServer(BlockStore(tmp_path / "a")).attach(a)
                BlockServer(BlockStore(tmp_path / "b")).attach(b)
                peers = await connect_all(client, [a, b])
                reports.append(await fetch_dag(root, peers, opener(client), local, batch=1))

    trio.run(main)
    (report,) = reports
    assert exported(local, root, tmp_path / "out") == data
    assert all(count > 0 for count in report.served.values()) and len(report.served) == 2, report.served
    assert sum(report.served.values()) == report.blocks_fetched == 6 and not report.failures


class Fault(Enum):
    """What provider A does wrong while an honest provider B holds the whole file."""

    PROVIDER_STOPPED_MIDWAY = "its node stops after serving a few blocks"
    WRONG_BLOCK = "answers with bytes that do not hash to the CID asked for"
    MISSING_BLOCKS = "holds only the root and the first leaf"
    SILENT = "accepts the want and never answers"


REASONS = {
    Fault.PROVIDER_STOPPED_MIDWAY: r"no answer for|want not accepted",
    Fault.WRONG_BLOCK: r"do not hash to",
    Fault.MISSING_BLOCKS: r"does not have block",
    Fault.SILENT: r"no answer for .*FrameTimeout",
}


class StoppingStore(BlockStore):
    """A provider's store that stops the provider's node on its `stop_after`-th read (from the server's thread)."""

    def __init__(self, root: Path, node: P2PNode, stop_after: int) -> None:
        super().__init__(root)
        self.node = node
        self.reads_left = stop_after

    def get(self, cid: Cid | str) -> bytes:
        """Read a block; on the last allowed read, stop the node."""
        self.reads_left -= 1
        if self.reads_left == 0:
            trio.from_thread.run_sync(self.node.stop)
        return super().get(cid)


def hostile_handler(store: BlockStore, honest: set[Cid]) -> Callable[[Libp2pStream], Awaitable[None]]:
    """A hostile provider: answers every want, but with one byte flipped in each block outside `honest`.

    The honest BlockServer cannot send wrong bytes (its store verifies every read), so this fault needs its own
    handler speaking the protocol.
    """

    async def handle(stream: Libp2pStream) -> None:
        try:
            while True:
                want = await receive_frame(stream, WANT_LIMITS, read_timeout=READ_TIMEOUT * 5)
                for cid in decode_want(want.payload):
                    data = bytearray(store.get(cid))
                    if cid not in honest:
                        data[len(data) // 2] ^= 0x01
                    await send_frame(stream, BLOCK, bytes(data))
        except FrameError:
            return

    return handle


async def silent_handler(stream: Libp2pStream) -> None:
    """A provider that accepts one want and then sends nothing until the requester goes away."""
    await receive_frame(stream, WANT_LIMITS)
    while await stream.read(1024):
        pass


class FirstWrite:
    """A ByteStream that sets `event` when it is first written to (the requester's first want on it)."""

    def __init__(self, inner: ByteStream, event: trio.Event) -> None:
        self.inner = inner
        self.event = event

    async def read(self, n: int) -> bytes:
        """Read through."""
        return await self.inner.read(n)

    async def write(self, data: bytes) -> None:
        """Write through, then signal."""
        await self.inner.write(data)
        self.event.set()

    async def close(self) -> None:
        """Close through."""
        await self.inner.close()


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_a_faulty_provider_is_dropped_and_the_other_completes(fault: Fault, tmp_path: Path) -> None:
    data = random_file(tmp_path / "file.bin", 6 * CHUNK_SIZE, seed=4)
    root = add_file(tmp_path / "full", tmp_path / "file.bin")
    full = BlockStore(tmp_path / "full")
    leaves = leaves_of(full, root)
    local = BlockStore(tmp_path / "local")
    reports: list[FetchReport] = []
    ids: list[str] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with running_nodes(3) as (a, b, client):
                if fault is Fault.PROVIDER_STOPPED_MIDWAY:
                    BlockServer(StoppingStore(tmp_path / "full", a, stop_after=3)).attach(a)
                elif fault is Fault.WRONG_BLOCK:
                    a.set_stream_handler(PROTOCOL, hostile_handler(full, honest={root}))
                elif fault is Fault.MISSING_BLOCKS:
                    partial = BlockStore(tmp_path / "partial")
                    for cid in (root, leaves[0]):
                        partial.put(cid, full.get(cid))
                    BlockServer(partial).attach(a)
                else:
                    a.set_stream_handler(PROTOCOL, silent_handler)
                BlockServer(full).attach(b)
                peer_a, peer_b = await connect_all(client, [a, b])
                ids.extend((str(peer_a), str(peer_b)))
                a_asked = trio.Event()

                async def open_stream(peer: ID) -> ByteStream:
                    # B starts once A has sent its first want, so that A surely holds a batch when its fault shows
                    if peer == peer_b:
                        await a_asked.wait()
                        return await client.open_stream(peer, PROTOCOL)
                    return FirstWrite(await client.open_stream(peer, PROTOCOL), a_asked)

                reports.append(
                    await fetch_dag(root, [peer_a, peer_b], open_stream, local, batch=2, read_timeout=READ_TIMEOUT)
                )

    trio.run(main)
    (report,) = reports
    id_a, id_b = ids
    assert exported(local, root, tmp_path / "out") == data
    assert stored_blocks(local) == len(leaves) + 1
    assert list(report.failures) == [id_a] and re.search(REASONS[fault], report.failures[id_a]), report.failures
    assert report.served[id_b] > 0
    assert report.served[id_a] > 0 if fault is not Fault.SILENT else report.served[id_a] == 0
    assert report.blocks_fetched == len(leaves) + 1 == sum(report.served.values())


def test_all_providers_bad_then_resume_from_an_honest_one(tmp_path: Path) -> None:
    data = random_file(tmp_path / "file.bin", 5 * CHUNK_SIZE, seed=5)
    root = add_file(tmp_path / "full", tmp_path / "file.bin")
    full = BlockStore(tmp_path / "full")
    leaves = leaves_of(full, root)
    partial = BlockStore(tmp_path / "partial")
    for cid in (root, leaves[0], leaves[1]):
        partial.put(cid, full.get(cid))
    local = BlockStore(tmp_path / "local")
    failed: list[FetchError] = []
    reports: list[FetchReport] = []
    ids: list[str] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with running_nodes(4) as (hostile, lacking, honest, client):
                hostile.set_stream_handler(PROTOCOL, hostile_handler(full, honest={root}))
                BlockServer(partial).attach(lacking)
                BlockServer(full).attach(honest)
                peers = await connect_all(client, [hostile, lacking, honest])
                ids.extend(str(peer) for peer in peers)
                with pytest.raises(FetchError) as error:
                    await fetch_dag(root, peers[:2], opener(client), local, batch=1, read_timeout=READ_TIMEOUT)
                failed.append(error.value)
                assert stored_blocks(local) >= 1  # the root at least, from either
                reports.append(await fetch_dag(root, peers[2:], opener(client), local, read_timeout=READ_TIMEOUT))

    trio.run(main)
    error, (resumed,) = failed[0], reports
    id_hostile, id_lacking, id_honest = ids
    assert set(error.failures) == {id_hostile, id_lacking} and error.missing > 0
    assert f"{id_hostile}: " in str(error) and "do not hash to" in str(error)
    assert f"{id_lacking}: " in str(error) and "does not have block" in str(error)
    assert resumed.blocks_present >= 1 and resumed.blocks_present + resumed.blocks_fetched == len(leaves) + 1
    assert resumed.served == {id_honest: resumed.blocks_fetched} and not resumed.failures
    assert exported(local, root, tmp_path / "out") == data
    assert stored_blocks(local) == len(leaves) + 1


def test_fetch_with_everything_present_opens_no_stream(tmp_path: Path) -> None:
    random_file(tmp_path / "file.bin", 2 * CHUNK_SIZE + 5, seed=6)
    root = add_file(tmp_path / "local", tmp_path / "file.bin")
    seen: list[tuple[int, int]] = []

    async def never(peer: ID) -> ByteStream:
        raise AssertionError("no stream should be opened")

    size = 2 * CHUNK_SIZE + 5  # three leaves and the root
    local = BlockStore(tmp_path / "local")
    report = trio.run(lambda: fetch_dag(root, [], never, local, recorder(seen)))
    assert (report.blocks_present, report.blocks_fetched, seen) == (4, 0, [(size, size)])
    with pytest.raises(FetchError, match="no providers"):
        trio.run(lambda: fetch_dag(root, [], never, BlockStore(tmp_path / "empty")))


def test_repeated_blocks_are_fetched_once_and_a_non_unixfs_dag_is_refused(tmp_path: Path) -> None:
    zeros = bytes(3 * CHUNK_SIZE)  # three identical leaves: one block
    (tmp_path / "zeros.bin").write_bytes(zeros)
    root = add_file(tmp_path / "provider", tmp_path / "zeros.bin")
    provider_store = BlockStore(tmp_path / "provider")
    foreign = Cid(1, 0x71, multihash_sha256(b"a dag-cbor block"))  # a link no UnixFS file has
    odd = encode_file_node([(foreign.to_bytes(), 16, 16)])
    odd_root = Cid.for_block(odd, DAG_PB)
    provider_store.put(odd_root, odd)
    local = BlockStore(tmp_path / "local")
    reports: list[FetchReport] = []
    seen: list[tuple[int, int]] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with running_nodes(2) as (provider, client):
                BlockServer(provider_store).attach(provider)
                peers = await connect_all(client, [provider])
                reports.append(await fetch_dag(root, peers, opener(client), local, recorder(seen)))
                with pytest.raises(FetchError, match="must be raw or dag-pb"):
                    await fetch_dag(odd_root, peers, opener(client), local)

    trio.run(main)
    assert reports[0].blocks_fetched == 2 and seen[-1] == (len(zeros), len(zeros))
    assert exported(local, root, tmp_path / "out") == zeros
    assert stored_blocks(local) == 3  # the zeros' root and leaf, and the odd root (it hashes to its CID)


def test_server_refuses_malformed_wants_and_keeps_serving(tmp_path: Path) -> None:
    random_file(tmp_path / "file.bin", 2 * CHUNK_SIZE, seed=7)
    root = add_file(tmp_path / "store", tmp_path / "file.bin")
    store = BlockStore(tmp_path / "store")
    leaf = leaves_of(store, root)[0]
    unknown = Cid.for_block(b"not stored anywhere", root.codec)
    valid = str(root)
    malformed = [
        b"{not json",
        b'{"v": 1, "cids": []}',
        b'{"v": 2, "cids": ["%s"]}' % valid.encode(),
        b'{"v": 1, "cids": ["%s"], "extra": 1}' % valid.encode(),
        b'{"v": 1, "cids": [%s]}' % b",".join([b'"%s"' % valid.encode()] * (MAX_CIDS + 1)),
        b'{"v": 1, "cids": ["bafynotacid"]}',
        b'{"v": 1, "cids": ["%s"]}' % (b"b" * 129),
    ]
    outcomes: list[str] = []
    answers: list[tuple[str, bytes]] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with running_nodes(2) as (server_node, client):
                server = BlockServer(store)

                async def recording(stream: Libp2pStream) -> None:
                    try:
                        await server.handle(stream)
                        outcomes.append("returned")
                    except Exception as exc:
                        outcomes.append(repr(exc))

                server_node.set_stream_handler(PROTOCOL, recording)
                (peer,) = await connect_all(client, [server_node])
                for payload in malformed:
                    stream = await client.open_stream(peer, PROTOCOL)
                    await send_frame(stream, WANT, payload, ack_timeout=READ_TIMEOUT)
                    with pytest.raises(FrameTruncated):  # the server hung up instead of answering
                        await receive_frame(stream, ANSWER_LIMITS, read_timeout=READ_TIMEOUT)
                    await stream.close()
                stream = await client.open_stream(peer, PROTOCOL)
                with pytest.raises(FrameRejected) as refused:
                    await send_frame(stream, WANT, b" " * (WANT_LIMITS[WANT] + 1), ack_timeout=READ_TIMEOUT)
                assert refused.value.nack is Kind.NACK_TOO_LARGE
                await stream.close()

                stream = await client.open_stream(peer, PROTOCOL)  # a fresh, valid stream: two wants on it
                for want in ([root, unknown, leaf], [leaf]):
                    await send_frame(stream, WANT, encode_want(want), ack_timeout=READ_TIMEOUT)
                    for _ in want:
                        frame = await receive_frame(stream, ANSWER_LIMITS, read_timeout=READ_TIMEOUT)
                        answers.append((frame.msg_type, frame.payload))
                await stream.close()
                with trio.fail_after(5):
                    while len(outcomes) < len(malformed) + 2:
                        await trio.sleep(0.01)

    trio.run(main)
    assert outcomes == ["returned"] * (len(malformed) + 2)
    assert answers == [
        (BLOCK, store.get(root)),
        (BLOCK_NONE, b""),
        (BLOCK, store.get(leaf)),
        (BLOCK, store.get(leaf)),
    ]


def bomb(store: BlockStore, links: int = 174) -> tuple[Cid, int]:
    """A UnixFS file whose root links one 256 KiB leaf `links` times: a few blocks that declare `links` x 256 KiB."""
    leaf = bytes(CHUNK_SIZE)
    leaf_cid = Cid.for_block(leaf, RAW)
    store.put(leaf_cid, leaf)
    root = encode_file_node([(leaf_cid.to_bytes(), CHUNK_SIZE, CHUNK_SIZE)] * links)
    root_cid = Cid.for_block(root, DAG_PB)
    store.put(root_cid, root)
    return root_cid, links * CHUNK_SIZE


def test_a_dag_bomb_is_refused_at_its_root_before_anything_under_it_is_fetched(tmp_path: Path) -> None:
    # Arrange: 2 distinct blocks (256 KiB) that declare 43.5 MiB; the caller expects at most 1 MiB
    provider_store = BlockStore(tmp_path / "provider")
    root, declared = bomb(provider_store)
    local = BlockStore(tmp_path / "local")

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with running_nodes(2) as (provider, client):
                BlockServer(provider_store).attach(provider)
                peers = await connect_all(client, [provider])
                # Act
                with pytest.raises(FetchError, match=f"declares {declared} bytes, more than the 1048576 expected"):
                    await fetch_dag(root, peers, opener(client), local, max_bytes=1 << 20)

    trio.run(main)
    # Assert: nothing was stored, not even the root
    assert stored_blocks(local) == 0
