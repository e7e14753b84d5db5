"""Federation descriptors in a real libp2p Kademlia DHT of in-process hosts on 127.0.0.1: published, fetched,
and refused by every node when forged, misplaced or replacing another."""

import json
from contextlib import AsyncExitStack
from typing import Any

import msgspec
import pytest
import trio

from crypto.identity import Identity
from crypto.signed import sign_struct
from federation.descriptor import (
    DescriptorError,
    FederationDescriptor,
    descriptor_key,
    verify_descriptor,
)
from node.fed.dht import (
    FED_NAMESPACE,
    DescriptorConflict,
    DescriptorValidator,
    DhtFederations,
    federation_validators,
)
from node.market.registry_dht import registry_node
from node.p2p.host import P2PConfig, P2PNode
from tests.federation_support import NOW, make_descriptor

DEADLINE = 60
CONFIG = P2PConfig(dial_timeout=5, negotiate_timeout=5)


def fed_node(identity: Identity) -> tuple[P2PNode, DhtFederations]:
    """A node whose DHT validates both namespaces, as the daemon builds it."""
    node, _ = registry_node(identity, CONFIG, federation_validators())
    assert node.dht is not None
    return node, DhtFederations(node.dht)


async def start_line(stack: AsyncExitStack, nursery: trio.Nursery, n: int) -> list[tuple[P2PNode, DhtFederations]]:
    """`n` nodes, each dialling the previous one; returns once every routing table holds all others."""
    nodes: list[tuple[P2PNode, DhtFederations]] = []
    for _ in range(n):
        node, federations = fed_node(Identity.generate())
        await nursery.start(node.run)
        stack.callback(node.stop)
        if nodes:
            await node.connect(nodes[-1][0].listen_addrs[0])
        nodes.append((node, federations))
    while any(len(node.known_peers()) < n - 1 for node, _ in nodes):
        for node, _ in nodes:
            await node.discover()
    return nodes


@pytest.fixture(scope="module")
def creator() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def descriptor(creator: Identity) -> bytes:
    return make_descriptor(creator)


def test_a_descriptor_published_at_one_end_is_fetched_at_the_other(creator: Identity, descriptor: bytes) -> None:
    results: dict[str, Any] = {}

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                nodes = await start_line(stack, nursery, 4)
                (_, publisher), (_, searcher) = nodes[0], nodes[-1]
                # Act
                results["published"] = await publisher.publish(descriptor)
                results["fetched"] = await searcher.fetch("finance-club", creator.fingerprint)
                results["bytes"] = await searcher.fetch_bytes("finance-club", creator.fingerprint)
                results["by id"] = await searcher.fetch("finance-club", creator.fingerprint, "00" * 32)
                results["unknown"] = await searcher.fetch("no-such-club", creator.fingerprint)
                await publisher.publish(descriptor)  # republishing the same bytes is fine
                key = descriptor_key("finance-club", creator.fingerprint).encode()
                results["holders"] = sum(n.dht.value_store.get(key) is not None for n, _ in nodes if n.dht)
                nursery.cancel_scope.cancel()

    trio.run(main)
    expected = verify_descriptor(descriptor)
    assert results["published"] == expected and results["fetched"] == expected
    assert results["bytes"] == descriptor  # the creator's signed bytes, as a joiner hands them on
    assert results["by id"] is None and results["unknown"] is None
    assert results["holders"] == 4


def resigned(signer: Identity, descriptor: bytes, **change: Any) -> bytes:
    """`descriptor` with `change` applied, signed by `signer` without any consistency check."""
    body = json.loads(descriptor) | change
    body.pop("signature")
    return msgspec.json.encode(sign_struct(signer, msgspec.convert(body, FederationDescriptor)))


def test_dht_peers_refuse_forged_misplaced_and_replacing_descriptors(creator: Identity, descriptor: bytes) -> None:
    outcomes: dict[str, bool] = {}
    attacker_id = Identity.generate()
    key = descriptor_key("finance-club", creator.fingerprint)
    tampered = descriptor.replace(b'"local_steps":50', b'"local_steps":40')
    replacement = make_descriptor(creator, local_steps=40)  # validly signed by the creator, same name
    impostor = resigned(attacker_id, descriptor, creator_key=attacker_id.public_key_b64())
    elsewhere = descriptor_key("other-club", creator.fingerprint)

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                (victim, _), (attacker, _) = await start_line(stack, nursery, 2)
                assert victim.dht is not None and attacker.dht is not None
                store = attacker.dht.value_store._store_at_peer
                # Act: the attacker's raw PUT_VALUEs, bypassing its own validator
                for label, value, as_key in [
                    ("bad signature", tampered, key),
                    ("impostor", impostor, key),  # signed by the attacker, claiming the creator
                    ("wrong key", descriptor, elsewhere),
                    ("garbage", b"\xff" * 100, key),
                    ("oversized", descriptor + b" " * 9000, key),
                    ("valid", descriptor, key),
                    ("same again", descriptor, key),
                    ("replacement", replacement, key),
                ]:
                    outcomes[label] = bool(await store(victim.peer_id, as_key.encode(), value))
                held = victim.dht.value_store.get(key.encode())
                outcomes["victim keeps the first"] = held is not None and held.value == descriptor
                outcomes["nothing else stored"] = victim.dht.value_store.size() == 1
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert outcomes == {
        "bad signature": False,
        "impostor": False,
        "wrong key": False,
        "garbage": False,
        "oversized": False,
        "valid": True,
        "same again": True,
        "replacement": False,
        "victim keeps the first": True,
        "nothing else stored": True,
    }


def test_every_node_picks_the_same_of_two_descriptors_under_one_name(creator: Identity, descriptor: bytes) -> None:
    later = make_descriptor(creator, created=NOW + 1, local_steps=40)
    found: dict[str, Any] = {}

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                (searcher, federations), (b, _), (c, _) = await start_line(stack, nursery, 3)
                assert searcher.dht is not None
                store = searcher.dht.value_store._store_at_peer
                key = descriptor_key("finance-club", creator.fingerprint).encode()
                # Act: the creator equivocates: B holds the later descriptor, C the earlier one
                assert await store(b.peer_id, key, later) and await store(c.peer_id, key, descriptor)
                found["all"] = await federations.descriptors("finance-club", creator.fingerprint)
                found["chosen"] = await federations.fetch("finance-club", creator.fingerprint)
                found["chosen bytes"] = await federations.fetch_bytes("finance-club", creator.fingerprint)
                later_id = verify_descriptor(later).federation_id
                found["by id"] = await federations.fetch("finance-club", creator.fingerprint, later_id)
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(found["all"]) == 2
    assert found["chosen"] == verify_descriptor(descriptor) and found["by id"] == verify_descriptor(later)
    assert found["chosen bytes"] == descriptor  # the same choice as fetch, whichever peer answered first


def test_publishing_refuses_bad_and_replacing_descriptors_before_sending(creator: Identity, descriptor: bytes) -> None:
    errors: list[Exception] = []

    async def main() -> None:
        node, federations = fed_node(Identity.generate())
        async with node:
            await federations.publish(descriptor)
            for value in (make_descriptor(creator, local_steps=40), descriptor[:-2]):
                try:
                    await federations.publish(value)
                except (DescriptorConflict, DescriptorError) as exc:
                    errors.append(exc)

    trio.run(main)
    assert [type(e) for e in errors] == [DescriptorConflict, DescriptorError]
    assert "immutable" in str(errors[0])


def test_select_keeps_the_first_valid_descriptor(creator: Identity, descriptor: bytes) -> None:
    validator = DescriptorValidator()
    key = descriptor_key("finance-club", creator.fingerprint)
    other = make_descriptor(creator, local_steps=40)
    assert validator.select(key, [b"junk", descriptor, other]) == 1
    assert validator.select(key, [descriptor, descriptor]) == 1  # the same again: its copy refreshes the record
    assert validator.select(key, [b"junk", b"{}"]) == 0
    assert validator.select(descriptor_key("x", creator.fingerprint), [descriptor]) == 0
    assert list(federation_validators()) == [FED_NAMESPACE] and FED_NAMESPACE == "mirador-fed"
