"""A peer that holds DHT streams open against a real DHT server (in-process libp2p hosts on 127.0.0.1)."""

import logging
from contextlib import AsyncExitStack

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import PROTOCOL_ID

from crypto.identity import Identity
from marketplace.registry_record import record_key, sign_record
from node.market.registry_dht import registry_node
from node.p2p.dht_guard import DhtLimits
from node.p2p.host import P2PConfig

CONFIG = P2PConfig(dial_timeout=5, negotiate_timeout=5)
CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
LIMITS = DhtLimits()
DEADLINE = 60


def test_streams_held_open_by_stalling_peers_do_not_silence_the_dht() -> None:
    # Arrange: a DHT server that holds a record; 3 stalling peers, each opening 5 DHT streams and sending one byte of
    # an unfinished length varint on each (py-libp2p serves 12 streams at once and waited on such a stream forever)
    outcome: dict[str, object] = {}

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            publisher = Identity.generate()
            victim, _ = registry_node(Identity.generate(), CONFIG)
            async with victim, AsyncExitStack() as stack:
                assert victim.dht is not None
                key = record_key("held", publisher.fingerprint)
                record = sign_record(publisher, "held", {"1.0.0": CID}, seq=1)
                await victim.dht.put_value(key, record)
                target = str(victim.listen_addrs[0])
                opened = 0
                for _ in range(3):
                    staller, _ = registry_node(Identity.generate(), CONFIG)
                    await stack.enter_async_context(staller)
                    peer = await staller.connect(target)
                    for _ in range(LIMITS.per_peer + 1):
                        try:
                            stream = await staller.host.new_stream(peer, [TProtocol(PROTOCOL_ID)])
                            await stream.write(b"\x80")
                            opened += 1
                        except Exception:
                            pass
                outcome["stalling streams"] = opened
                honest, _ = registry_node(Identity.generate(), CONFIG)
                async with honest:
                    assert honest.dht is not None
                    peer = await honest.connect(target)
                    started = trio.current_time()
                    # Act: the honest peer asks for the record until it is answered
                    value = None
                    with trio.move_on_after(LIMITS.idle_s * 3):
                        while value is None:
                            value = await honest.dht.value_store._get_from_peer(peer, key.encode())
                            await trio.sleep(0.2)
                    outcome["answered"] = value == record
                    outcome["after_s"] = trio.current_time() - started
                outcome["refusals"] = dict(victim.stream_refusals)

    trio.run(main)
    # Assert: at most per_peer streams each were held, the held ones timed out, and the honest peer got its answer
    refusals = outcome["refusals"]
    assert isinstance(refusals, dict)
    assert refusals.get(f"{PROTOCOL_ID} read_timeout", 0) >= 3 * LIMITS.per_peer, outcome
    assert outcome["answered"] is True, outcome
    assert isinstance(outcome["after_s"], float) and outcome["after_s"] < LIMITS.idle_s * 2, outcome


def test_an_asker_closing_its_stream_after_the_answer_is_a_quiet_clean_end(caplog: pytest.LogCaptureFixture) -> None:
    # Arrange: a DHT server holding a record, an honest peer connected to it
    caplog.set_level(logging.DEBUG, logger="libp2p.kad_dht")
    answers: list[bool] = []

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            publisher = Identity.generate()
            server, _ = registry_node(Identity.generate(), CONFIG)
            asker, _ = registry_node(Identity.generate(), CONFIG)
            async with server, asker:
                assert server.dht is not None and asker.dht is not None
                key = record_key("asked", publisher.fingerprint)
                record = sign_record(publisher, "asked", {"1.0.0": CID}, seq=1)
                await server.dht.put_value(key, record)
                peer = await asker.connect(str(server.listen_addrs[0]))
                # Act: five requests, each on its own stream that the asker closes after reading the answer
                for _ in range(5):
                    answers.append(await asker.dht.value_store._get_from_peer(peer, key.encode()) == record)
                await trio.sleep(0.5)  # the server's handlers see the end of their streams

    trio.run(main)
    # Assert: every request answered, and each stream ended as a clean EOF (py-libp2p logged a warning and reset it)
    assert answers == [True] * 5
    server_side = [r.getMessage() for r in caplog.records if r.name == "libp2p.kad_dht.kad_dht"]
    assert not [m for m in server_side if "Failed to read DHT message" in m], server_side
    assert sum("Stream closed (EOF)" in m for m in server_side) == 5, server_side
