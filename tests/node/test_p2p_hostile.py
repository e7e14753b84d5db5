"""A hostile peer against a real daemon: a test harness (in-process libp2p host) speaking the node's protocols.

Each fault is refused, nothing is stored, and the daemon keeps serving chat and blocks afterwards.
"""

import contextlib
import enum
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from crypto.identity import Identity
from marketplace.blockstore import BlockStore
from marketplace.cid import Cid
from marketplace.registry_record import parse_record, record_key, sign_record
from node.market.block_exchange import PROTOCOL, encode_want, fetch_dag
from node.market.registry_dht import registry_node
from node.p2p.framing import HEADER_SIZE, ByteStream, FrameError, Kind, decode_header, encode_header, send_frame
from node.p2p.host import P2PConfig, P2PNode, tcp_multiaddr
from node.p2p.notices import TOPIC
from tests.daemon_harness import Daemon, node_env, start_daemon

pytestmark = pytest.mark.slow  # hostile libp2p peers against a daemon

DEADLINE = 60
CONFIG = P2PConfig(dial_timeout=5, negotiate_timeout=5)


class Fault(enum.Enum):
    """What the hostile peer sends."""

    OVERSIZED_FRAME = "a blocks.want frame declaring 1 GiB"
    WRONG_DIGEST = "a frame whose payload does not match its sha256"
    MALFORMED_WANT = "a frame whose payload is not a want"
    TOO_MANY_CIDS = "a want of 65 CIDs"
    BAD_HEADER = "61 bytes of garbage instead of a header"
    UNSIGNED_RECORD = "a registry record without a signature"
    FORGED_RECORD = "a record under the publisher's key signed by someone else"
    REPLAYED_RECORD = "the publisher's older record (rollback to 1.0.0)"
    FOREIGN_NAMESPACE = "a value outside the /mirador/ namespace"


def cli(d: Daemon, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", *args], env=node_env(d.home, d.port), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, dict[str, bytes]]]:
    """A daemon that published `notes` 1.0.0 then 2.0.0 (the harness captured the older record in between)."""
    tmp = tmp_path_factory.mktemp("hostile")
    d = start_daemon(tmp / "victim")
    try:
        (tmp / "notes.txt").write_text("version one\n")
        cli(d, "model", "publish", str(tmp / "notes.txt"), "--name", "notes", "--version", "1.0.0", "--no-bench")
        records = {"v1": trio.run(fetch_record, d)}
        (tmp / "notes.txt").write_text("version two\n")
        cli(d, "model", "publish", str(tmp / "notes.txt"), "--name", "notes", "--version", "2.0.0", "--no-bench")
        records["v2"] = trio.run(fetch_record, d)
        yield d, records
    finally:
        d.stop()


def daemon_addr(d: Daemon) -> str:
    return httpx.get(f"{d.url}/v1/node/peers", timeout=10).json()["listen_addrs"][0]


def publisher_fp(d: Daemon) -> str:
    return cli(d, "keys", "show").split("fingerprint")[1].split()[0].strip(": ")


async def fetch_record(d: Daemon) -> bytes:
    """The daemon's current `notes` record, read from it over the DHT protocol."""
    node, _ = registry_node(Identity.generate(), CONFIG)
    async with node:
        peer = await node.connect(daemon_addr(d))
        assert node.dht is not None
        value = await node.dht.value_store._get_from_peer(peer, record_key("notes", publisher_fp(d)).encode())
        assert isinstance(value, bytes)
        return value


async def raw_frame(node: P2PNode, peer: ID, header: bytes, payload: bytes) -> bytes:
    """Open a blocks stream, send raw bytes, return what the daemon answers (b"" if it just closes)."""
    stream = await node.open_stream(peer, PROTOCOL)
    await stream.write(header + payload)
    answer = b""
    with trio.move_on_after(5):
        while len(answer) < HEADER_SIZE:
            chunk = await stream.read(HEADER_SIZE - len(answer))
            if not chunk:
                break
            answer += chunk
    return answer


async def inflict(fault: Fault, node: P2PNode, peer: ID, records: dict[str, bytes], fp: str) -> str:
    """Send one fault; return what the daemon answered (a NACK kind, 'closed', or the DHT's store verdict)."""
    key = record_key("notes", fp)
    if fault is Fault.OVERSIZED_FRAME:
        answer = await raw_frame(node, peer, encode_header(Kind.DATA, "blocks.want", 2**30, bytes(32)), b"")
    elif fault is Fault.WRONG_DIGEST:
        payload = encode_want([Cid.parse(records_cid(records))])
        answer = await raw_frame(node, peer, encode_header(Kind.DATA, "blocks.want", len(payload), bytes(32)), payload)
    elif fault is Fault.BAD_HEADER:
        answer = await raw_frame(node, peer, os.urandom(HEADER_SIZE), b"")
    elif fault in (Fault.MALFORMED_WANT, Fault.TOO_MANY_CIDS):
        payload = b'{"v": 1, "cids": "not a list"}' if fault is Fault.MALFORMED_WANT else too_many_cids()
        stream = await node.open_stream(peer, PROTOCOL)
        try:
            await send_frame(stream, "blocks.want", payload)
            answer = await stream.read(HEADER_SIZE)  # a block answer would come now; the daemon closes instead
        except FrameError as exc:
            return type(exc).__name__
        return "closed" if not answer else f"answered {decode_header(answer[:HEADER_SIZE]).kind.name}"
    else:
        assert node.dht is not None
        value = {
            Fault.UNSIGNED_RECORD: lambda: msgspec.json.encode(
                msgspec.structs.replace(parse_record(records["v1"]), signature="")
            ),
            Fault.FORGED_RECORD: lambda: sign_record(Identity.generate(), "notes", {"9.0.0": records_cid(records)}, 9),
            Fault.REPLAYED_RECORD: lambda: records["v1"],
            Fault.FOREIGN_NAMESPACE: lambda: b"anything",
        }[fault]()
        target = "/elsewhere/notes" if fault is Fault.FOREIGN_NAMESPACE else key
        stored = await node.dht.value_store._store_at_peer(peer, target.encode(), value)
        return "stored" if stored else "refused"
    return decode_header(answer).kind.name if len(answer) == HEADER_SIZE else "closed"


async def fetch_envelope(node: P2PNode, peer: ID, records: dict[str, bytes], tmp_path: Path) -> bytes:
    """The current (2.0.0) envelope fetched from the daemon over the block exchange into a fresh store."""
    store = BlockStore(tmp_path / "blocks")
    root = Cid.parse(parse_record(records["v2"]).versions[0].envelope_cid)

    async def open_stream(p: ID) -> ByteStream:
        return await node.open_stream(p, PROTOCOL)

    await fetch_dag(root, [peer], open_stream, store)
    return b"".join(store.cat(root))


def records_cid(records: dict[str, bytes]) -> str:
    return parse_record(records["v1"]).versions[0].envelope_cid


def too_many_cids() -> bytes:
    cid = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    return msgspec.json.encode({"v": 1, "cids": [cid] * 65})


EXPECTED = {
    Fault.OVERSIZED_FRAME: {"NACK_TOO_LARGE"},
    Fault.WRONG_DIGEST: {"NACK_DIGEST"},
    Fault.BAD_HEADER: {"NACK_BAD_HEADER", "closed"},
    Fault.MALFORMED_WANT: {"closed"},
    Fault.TOO_MANY_CIDS: {"closed"},
    Fault.UNSIGNED_RECORD: {"refused"},
    Fault.FORGED_RECORD: {"refused"},
    Fault.REPLAYED_RECORD: {"refused"},
    Fault.FOREIGN_NAMESPACE: {"refused"},
}


def blocks_on_disk(home: Path) -> set[str]:
    return {p.name for p in (home / "blocks").rglob("*") if p.is_file()}


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_hostile_input_is_refused_nothing_is_stored_and_the_node_keeps_serving(
    fault: Fault, victim: tuple[Daemon, dict[str, bytes]], tmp_path: Path
) -> None:
    # Arrange
    d, records = victim
    fp = publisher_fp(d)
    blocks_before = blocks_on_disk(d.home)
    outcome: dict[str, object] = {}

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            node, _ = registry_node(Identity.generate(), CONFIG)
            async with node:
                peer = await node.connect(daemon_addr(d))
                # Act
                outcome["answer"] = await inflict(fault, node, peer, records, fp)
                # Then, as an honest peer: the daemon still serves its blocks and its current record
                outcome["fetched"] = await fetch_envelope(node, peer, records, tmp_path)
                assert node.dht is not None
                outcome["record"] = await node.dht.value_store._get_from_peer(peer, record_key("notes", fp).encode())

    trio.run(main)
    chat = d.chat("Hello")
    # Assert
    assert outcome["answer"] in EXPECTED[fault], f"{fault.value}: {outcome['answer']}"
    assert outcome["record"] == records["v2"]
    assert outcome["fetched"] == (d.home / "artifacts" / "notes" / "2.0.0" / "envelope.json").read_bytes()
    assert blocks_on_disk(d.home) == blocks_before
    assert chat.status_code == 200


def test_a_plaintext_only_dialer_cannot_connect_to_a_daemon(victim: tuple[Daemon, dict[str, bytes]]) -> None:
    d, _ = victim
    errors: list[str] = []

    async def main() -> None:
        key = create_new_key_pair()
        host = new_host(
            key_pair=key,
            sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key)},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},  # type: ignore[dict-item]
            listen_addrs=[tcp_multiaddr("127.0.0.1", 0)],
        )
        with trio.fail_after(DEADLINE):
            async with host.run(listen_addrs=[tcp_multiaddr("127.0.0.1", 0)]):
                try:
                    await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(daemon_addr(d))))
                except Exception as exc:
                    errors.append(type(exc).__name__)
                await host.close()

    trio.run(main)
    assert errors, "the plaintext dialer connected"
    assert d.chat("Hello").status_code == 200


def test_a_gossip_flood_is_refused_and_the_flooder_blacklisted_while_the_node_keeps_serving(
    victim: tuple[Daemon, dict[str, bytes]], tmp_path: Path
) -> None:
    # Arrange
    d, records = victim
    outcome: dict[str, object] = {}

    def notices() -> dict:
        return httpx.get(f"{d.url}/v1/node/status", timeout=10).json()["p2p"]["notices"]

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            hostile = P2PNode(Identity.generate(), P2PConfig(dht=False, dial_timeout=5, negotiate_timeout=5))
            async with hostile:
                assert hostile.pubsub is not None and hostile.gossipsub is not None
                peer = await hostile.connect(daemon_addr(d))
                await hostile.pubsub.subscribe(TOPIC)
                while peer not in hostile.pubsub.peer_topics.get(TOPIC, set()):
                    await trio.sleep(0.05)
                hostile.gossipsub.spam_protection_enabled = False  # a real attacker does not rate-limit itself
                # Act: 500 messages as fast as the daemon takes them: valid-looking hellos and garbage
                hostile_id = str(hostile.peer_id)
                for i in range(500):
                    data = (
                        b"\xff garbage"
                        if i % 5 == 0
                        else msgspec.json.encode(
                            {"type": "node.hello", "v": 1, "sent_at": int(time.time()), "agent": f"flood {i}"}
                        )
                    )
                    with contextlib.suppress(Exception):  # once blacklisted, the daemon drops us
                        await hostile.pubsub.publish(TOPIC, data)
                    with trio.move_on_after(0.5):
                        while len(hostile.pubsub.peer_queues.get(peer, ())) > 8:
                            await trio.sleep(0.001)
                    if i % 50 == 49 and hostile_id in (await trio.to_thread.run_sync(notices))["blacklisted"]:
                        break
                deadline = trio.current_time() + 20
                while hostile_id not in (await trio.to_thread.run_sync(notices))["blacklisted"]:
                    assert trio.current_time() < deadline, "the flooder was not blacklisted"
                    await trio.sleep(0.2)
                outcome["dropped"] = peer not in hostile.peers() or not await still_connected(hostile, peer)
        # Then an honest peer still fetches the daemon's blocks
        async with registry_node(Identity.generate(), CONFIG)[0] as honest:
            peer = await honest.connect(daemon_addr(d))
            outcome["fetched"] = await fetch_envelope(honest, peer, records, tmp_path)

    trio.run(main)
    status = notices()
    # Assert
    assert outcome["dropped"]
    assert status["refused"].get("rate_limited", 0) + status["refused"].get("undecodable", 0) > 0, status
    assert status["accepted"] <= 100, status  # at most the burst plus what the rate allowed during the flood
    assert outcome["fetched"] == (d.home / "artifacts" / "notes" / "2.0.0" / "envelope.json").read_bytes()
    assert d.chat("Hello").status_code == 200


async def still_connected(node: P2PNode, peer: ID) -> bool:
    """Whether `peer` is still connected a moment later (the daemon closes a blacklisted peer's connection)."""
    with trio.move_on_after(5):
        while peer in node.peers():
            await trio.sleep(0.1)
        return False
    return True
