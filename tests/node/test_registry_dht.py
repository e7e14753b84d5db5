"""Signed registry records in a real libp2p Kademlia DHT of in-process hosts on 127.0.0.1."""

from contextlib import AsyncExitStack

import msgspec
import pytest
import trio

from crypto.identity import Identity
from marketplace.registry_record import RecordRejected, parse_record, record_key, sign_record
from node.market.registry_dht import DhtRegistry, fingerprint_of_peer, name_key, registry_node
from node.p2p.host import P2PConfig, P2PNode

DEADLINE = 60
CID_A = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
CID_B = "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
CONFIG = P2PConfig(dial_timeout=5, negotiate_timeout=5)


async def start_line(stack: AsyncExitStack, nursery: trio.Nursery, n: int) -> list[tuple[P2PNode, DhtRegistry]]:
    """`n` registry nodes, each dialling the previous one; returns once every routing table holds all others."""
    nodes: list[tuple[P2PNode, DhtRegistry]] = []
    for _ in range(n):
        node, registry = registry_node(Identity.generate(), CONFIG)
        await nursery.start(node.run)
        stack.callback(node.stop)
        if nodes:
            await node.connect(nodes[-1][0].listen_addrs[0])
        nodes.append((node, registry))
    while any(len(node.known_peers()) < n - 1 for node, _ in nodes):
        for node, _ in nodes:
            await node.discover()
    return nodes


def test_a_record_published_at_one_end_is_found_at_the_other() -> None:
    found: list[str] = []
    stored_before: list[int] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                nodes = await start_line(stack, nursery, 4)
                (first, publisher), (_, searcher) = nodes[0], nodes[-1]
                # Act
                await publisher.announce("tiny-model", {"1.0.0": CID_A})
                records = await searcher.lookup("tiny-model")
                await publisher.announce("tiny-model", {"1.0.0": CID_A, "1.1.0": CID_B})
                newer = await searcher.lookup("tiny-model")
                stored_before.append(sum(n.dht.value_store.size() for n, _ in nodes if n.dht))
                found.extend(f"{v.version}={v.envelope_cid}" for r in records + newer for v in r.record.versions)
                assert fingerprint_of_peer(first.peer_id) == publisher.identity.fingerprint
                assert {r.record.publisher for r in records} == {publisher.identity.fingerprint}
                assert newer[0].record.seq > records[0].record.seq
                nursery.cancel_scope.cancel()

    trio.run(main)
    # Assert: the first lookup saw 1.0.0, the second both versions (a newer record replaced the cached one)
    assert found == [f"1.0.0={CID_A}", f"1.1.0={CID_B}", f"1.0.0={CID_A}"]
    assert stored_before[0] >= 2


def test_dht_peers_refuse_unsigned_forged_replayed_and_rolled_back_records() -> None:
    outcomes: dict[str, bool] = {}
    publisher_id, attacker_id = Identity.generate(), Identity.generate()

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                (victim, _), (attacker, _) = await start_line(stack, nursery, 2)
                assert victim.dht is not None and attacker.dht is not None
                key = record_key("tiny-model", publisher_id.fingerprint)
                v1 = sign_record(publisher_id, "tiny-model", {"1.0.0": CID_A}, seq=1)
                v2 = sign_record(publisher_id, "tiny-model", {"1.0.0": CID_A, "2.0.0": CID_B}, seq=2)
                rollback = sign_record(publisher_id, "tiny-model", {"1.0.0": CID_A}, seq=3)
                record = parse_record(v1)
                unsigned = msgspec.json.encode(msgspec.structs.replace(record, signature=""))
                forged = sign_record(attacker_id, "tiny-model", {"9.0.0": CID_B}, seq=9)
                store = attacker.dht.value_store._store_at_peer
                # Act: the attacker's raw PUT_VALUEs, bypassing its own validator
                for label, value, as_key in [
                    ("unsigned", unsigned, key),
                    ("forged", forged, key),  # signed by the attacker, stored under the publisher's key
                    ("v2", v2, key),
                    ("replayed v1", v1, key),
                    ("rollback", rollback, key),
                    ("garbage", b"\xff" * 100, key),
                    ("other namespace", b"x", "/elsewhere/key"),
                ]:
                    outcomes[label] = bool(await store(victim.peer_id, as_key.encode(), value))
                held = victim.dht.value_store.get(key.encode())
                outcomes["victim keeps v2"] = held is not None and held.value == v2
                outcomes["nothing else stored"] = victim.dht.value_store.size() == 1
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert outcomes == {
        "unsigned": False,
        "forged": False,
        "v2": True,
        "replayed v1": False,
        "rollback": False,
        "garbage": False,
        "other namespace": False,
        "victim keeps v2": True,
        "nothing else stored": True,
    }


def test_local_validator_refuses_a_replay_before_sending() -> None:
    identity = Identity.generate()
    errors: list[str] = []

    async def main() -> None:
        node, _ = registry_node(identity, CONFIG)
        async with node:
            assert node.dht is not None
            key = record_key("m", identity.fingerprint)
            await node.dht.put_value(key, sign_record(identity, "m", {"1.0.0": CID_A}, seq=5))
            try:
                await node.dht.put_value(key, sign_record(identity, "m", {"1.0.0": CID_A}, seq=4))
            except RecordRejected as exc:
                errors.append(str(exc))

    trio.run(main)
    assert errors and "replay refused" in errors[0]


def test_name_key_is_a_sha256_multihash() -> None:
    key = name_key("tiny-model")
    assert key[:2] == b"\x12\x20" and len(key) == 34 and key != name_key("tiny-model2")


@pytest.mark.slow  # 16 hosts converge in one thread
def test_a_lookup_returns_exactly_the_newest_records_that_the_whole_network_holds() -> None:
    # Arrange: 16 nodes; three publish one name (one of them twice), then a node replays that publisher's first
    # record to every peer (a rollback)
    got: dict[int, list[tuple[str, int, bytes]]] = {}
    truth: list[tuple[str, int, bytes]] = []
    rollbacks_stored: list[bool] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE * 3):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                nodes = await start_line(stack, nursery, 16)
                first = await nodes[5][1].announce("shared", {"1.0.0": CID_A})
                for i in (0, 5, 10):
                    await nodes[i][1].announce("shared", {"1.0.0": CID_A, f"1.{i}.0": CID_B})
                attacker = nodes[15][0].dht
                assert attacker is not None
                replay_key = record_key("shared", nodes[5][1].identity.fingerprint).encode()
                for node, _ in nodes[:15]:
                    rollbacks_stored.append(
                        bool(await attacker.value_store._store_at_peer(node.peer_id, replay_key, first))
                    )
                truth.extend(exhaustive(nodes, "shared"))
                # Act: lookups from publishers and from nodes that only store
                for i in (0, 3, 5, 8, 12, 15):
                    got[i] = [(r.record.publisher, r.record.seq, r.raw) for r in await nodes[i][1].lookup("shared")]
                nursery.cancel_scope.cancel()

    trio.run(main)
    # Assert: three publishers, node 5's second record; every lookup returned exactly those signed records
    assert len(truth) == 3 and not any(rollbacks_stored)
    assert all(found == truth for found in got.values()), (truth, got)


def exhaustive(nodes: list[tuple[P2PNode, DhtRegistry]], name: str) -> list[tuple[str, int, bytes]]:
    """Ground truth from every node's own stores: each provider of the name, and its newest record anywhere."""
    publishers = {
        fingerprint_of_peer(info.peer_id)
        for node, _ in nodes
        if node.dht is not None
        for info in node.dht.provider_store.get_providers(name_key(name))
    }
    newest = []
    for publisher in sorted(p for p in publishers if p is not None):
        key = record_key(name, publisher)
        held = [r.value for node, _ in nodes if node.dht and (r := node.dht.value_store.get(key.encode()))]
        records = [parse_record(v) for v in held]
        best = max(range(len(held)), key=lambda j: records[j].seq)
        newest.append((publisher, records[best].seq, held[best]))
    return newest


def test_a_pull_after_a_search_resolves_the_records_the_search_found(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Arrange: a publisher and a searcher; the searcher's clock moves only when told
    from marketplace.artifacts import LocalResolver
    from marketplace.registry import Registry
    from node.market.network_store import DhtResolver
    from node.market.registry_dht import RECENT_S

    now = [1000.0]
    seen: dict[str, object] = {}

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                (_, publisher), (_, searcher) = await start_line(stack, nursery, 2)
                searcher.clock = lambda: now[0]
                resolver = DhtResolver(searcher, set, LocalResolver(Registry(tmp_path / "state.db")))
                seen["before"] = searcher.recent("tiny-model")
                await publisher.announce("tiny-model", {"1.0.0": CID_A})
                # Act: a search; the publisher adds 1.1.0; pulls within RECENT_S, then after it
                searched = await searcher.lookup("tiny-model")
                await publisher.announce("tiny-model", {"1.0.0": CID_A, "1.1.0": CID_B})
                seen["searched"] = [v.version for r in searched for v in r.record.versions]
                seen["pull_latest"] = await trio.to_thread.run_sync(resolver.resolve, "tiny-model", None)
                seen["pull_new_version"] = await trio.to_thread.run_sync(resolver.resolve, "tiny-model", "1.1.0")
                seen["kept"] = searcher.recent("tiny-model") is not None
                await searcher.announce("tiny-model", {"9.0.0": CID_A})
                seen["after_own_announce"] = searcher.recent("tiny-model")
                await searcher.lookup("tiny-model")
                now[0] += RECENT_S + 1
                seen["expired"] = searcher.recent("tiny-model")
                nursery.cancel_scope.cancel()

    trio.run(main)
    # Assert: the pull without a version took the searched records (1.0.0 only, no second lookup needed); asking
    # for a version they lack looked again and found it; nothing is kept past RECENT_S or past our own announce
    assert seen["before"] is None and seen["searched"] == ["1.0.0"]
    assert seen["pull_latest"] == [CID_A]
    assert seen["pull_new_version"] == [CID_B]
    assert seen["kept"] and seen["after_own_announce"] is None and seen["expired"] is None
