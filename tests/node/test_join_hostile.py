"""A hostile joiner against a real daemon: a real libp2p host speaks /mirador/fed/join/1.0.0 to the creator of an HE
federation. Every bad request is answered with a refusal (or, for a broken stream, dropped alone), the peer is scored
down, nothing is stored, and the daemon keeps serving (issue 14, findings 1 and 2)."""

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from crypto.identity import Identity
from crypto.sealing import x25519_public_of
from federation.descriptor import sign_join
from node.fed import wire as fed_wire
from node.market.registry_dht import registry_node
from node.p2p.host import P2PConfig, peer_id_of
from tests.daemon_harness import Daemon, start_daemon

pytestmark = pytest.mark.slow  # a daemon and a hostile libp2p peer

DEADLINE = 60
CONFIG = P2PConfig(dial_timeout=5, negotiate_timeout=5)


@pytest.fixture(scope="module")
def creator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    """A daemon that created an HE federation (it holds the CKKS secret it seals to members): (daemon, its id)."""
    tmp = tmp_path_factory.mktemp("join-hostile")
    d = start_daemon(tmp / "creator")
    try:
        (d.home / "data").mkdir()
        (d.home / "data" / "data.txt").write_text("a paragraph to train on\n")
        spec = {"name": "secrets", "mode": "he", "data": str(d.home / "data" / "data.txt"), "min_members": 3}
        created = httpx.post(f"{d.url}/v1/federations", json=spec, headers=d.auth, timeout=120)
        assert created.status_code == 200, created.text
        yield d, created.json()["federation_id"]
    finally:
        d.stop()


def status(d: Daemon) -> dict[str, Any]:
    return httpx.get(f"{d.url}/v1/node/status", timeout=10).json()


def members(d: Daemon, fid: str) -> list[str]:
    rows = httpx.get(f"{d.url}/v1/federations", timeout=10).json()["federations"]
    return next(r["members"] for r in rows if r["federation_id"] == fid)


async def ask(d: Daemon, identity: Identity, requests: list[bytes]) -> list[fed_wire.Welcome | fed_wire.JoinRefused]:
    """Send each join request on its own stream from one libp2p host of `identity`; the welcome or the refusal."""
    node, _ = registry_node(identity, CONFIG)
    answers: list[fed_wire.Welcome | fed_wire.JoinRefused] = []
    with trio.fail_after(DEADLINE):
        async with node:
            addr = httpx.get(f"{d.url}/v1/node/peers", timeout=10).json()["listen_addrs"][0]
            peer = await node.connect(addr)
            for request in requests:
                stream = await node.open_stream(peer, fed_wire.JOIN_PROTOCOL)
                try:
                    answers.append(await fed_wire.request_join(stream, request))
                except fed_wire.JoinRefused as exc:
                    answers.append(exc)
                finally:
                    await stream.close()
    return answers


async def send_garbage(d: Daemon, identity: Identity) -> None:
    """61 bytes that are not a frame header, on a join stream."""
    node, _ = registry_node(identity, CONFIG)
    with trio.fail_after(DEADLINE):
        async with node:
            addr = httpx.get(f"{d.url}/v1/node/peers", timeout=10).json()["listen_addrs"][0]
            peer = await node.connect(addr)
            stream = await node.open_stream(peer, fed_wire.JOIN_PROTOCOL)
            await stream.write(b"\xff" * 61)
            with trio.move_on_after(5):
                while await stream.read(64):
                    pass


def x25519_b64(identity: Identity) -> str:
    return base64.b64encode(x25519_public_of(identity)).decode()


def test_bad_join_requests_are_refused_and_the_node_keeps_serving(creator: tuple[Daemon, str]) -> None:
    # Arrange
    d, fid = creator
    mallory = Identity.generate()
    zero_key = sign_join(mallory, fid, base64.b64encode(bytes(32)).decode())
    conflicting = Identity.generate()
    requests = [
        b'{"federation_id":"zz"}',  # killed the daemon: FederationStoreError escaped the handler
        b'{"federation_id": 7}',
        b"[1, 2, 3]",
        zero_key,  # an all-zero X25519 key under HE: the secret cannot be sealed to it (SealError)
        sign_join(conflicting, fid, x25519_b64(conflicting)),
        sign_join(conflicting, fid, x25519_b64(Identity.generate())),  # same member, other X25519 key
    ]

    # Act
    answers = trio.run(ask, d, mallory, requests[:4]) + trio.run(ask, d, conflicting, requests[4:])
    trio.run(send_garbage, d, mallory)

    # Assert
    reasons = [a.reason if isinstance(a, fed_wire.JoinRefused) else "welcome" for a in answers]
    assert reasons == [
        "malformed",  # not a join request at all: refused before the store is asked about "zz"
        "malformed",
        "malformed",
        "bad_seal",
        "welcome",
        "member_conflict",
    ]
    assert d.proc.poll() is None, d.log()[-3000:]
    assert d.chat().status_code == 200
    assert not any(mallory.fingerprint in m for m in members(d, fid)), "a key nobody can seal to was admitted"
    p2p = status(d)["p2p"]
    assert p2p["stream_refusals"][f"{fed_wire.JOIN_PROTOCOL} bad_frame"] == 1
    assert p2p["stream_refusals"][f"{fed_wire.JOIN_PROTOCOL} bad_seal"] == 1
    assert p2p["notices"]["scores"].get(str(peer_id_of(mallory)), 0) < 0


def test_an_aggregator_cannot_rejoin_as_a_member_to_get_the_he_secret(creator: tuple[Daemon, str]) -> None:
    # Arrange
    d, fid = creator
    eve = Identity.generate()
    as_aggregator = sign_join(eve, fid, x25519_b64(eve), role="aggregator")
    as_member = sign_join(eve, fid, x25519_b64(eve), role="member")

    # Act
    first, second = trio.run(ask, d, eve, [as_aggregator, as_member])

    # Assert
    assert isinstance(first, fed_wire.Welcome) and first.he_public and not first.he_secret_sealed
    assert isinstance(second, fed_wire.JoinRefused) and second.reason == "role_change", second
    assert f"{eve.fingerprint} (aggregator)" in members(d, fid)
