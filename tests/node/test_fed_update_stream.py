"""A hostile member against the aggregator's UPDATE stream, over real libp2p hosts on 127.0.0.1.

Hivemind-style fault injection: every way an update can be bad is one `Fault`; each is refused with exactly its
reason, recorded in the aggregator's FederationStore (`fed_rejections`), logged, and leaves the round's accepted set
as it was. Updates for a round that is not open are answered `round_closed` and logged: recorded for a round of a
federation this node is in (wrong round), not for a federation it does not know (see EXPECTED). Faults the
aggregator can judge from the signed header alone must be refused before the member is asked for the payload: the
frames the member sends are recorded, and the payload must never leave it.
"""

import enum
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import pytest
import trio
from libp2p.peer.id import ID

from crypto.identity import Identity
from crypto.signed import sign_struct
from federation.descriptor import (
    AdapterConfig,
    DpParams,
    Privacy,
    sign_descriptor,
)
from federation.messages import UPDATE_SCHEMA, UpdateHeader
from federation.round import RejectReason, RoundState
from federation.update import Layout, encode_tensors
from node.fed import wire as fed_wire
from node.fed.rounds.collect import UpdateCollector
from node.fed.store import FederationStore, RejectionRow
from node.p2p.framing import HEADER_SIZE, MAGIC, Kind, decode_header
from node.p2p.host import Libp2pStream, P2PConfig, P2PNode
from tests.federation.updates import LAYOUT, ROUND, adapter, non_finite, signed_update

DEADLINE_S = 15  # per test, hosts included
# The update stream needs neither the DHT nor gossipsub: bare hosts start in a few milliseconds.
CFG = P2PConfig(dht=False, pubsub=False, dial_timeout=5, negotiate_timeout=5)
NOW = 1_800_000_000.0
ROUND_DEADLINE = NOW + 300
OTHER_FID = hashlib.sha256(b"another federation").hexdigest()
SERVICE_LOGGER = "node.fed.rounds.collect"
ROUND_CLOSED = "round_closed"  # the handler's own verdict when no round is open for the header's (federation, round)


class Clock:
    """The round's injected clock: it moves only when a test says so."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Fault(enum.Enum):
    """What the hostile member sends to the aggregator of round 3."""

    LATE = "a member's good update after the round's deadline"
    DUPLICATE = "a second update from a member whose update was already accepted"
    WRONG_ROUND = "a member's update for round 2 while round 3 is open"
    WRONG_FEDERATION = "a member's update for another federation"
    NOT_A_MEMBER = "an update signed by a node that is not a member"
    WRONG_SENDER = "a member's good update relayed by another member's node"
    BAD_SIGNATURE = "a member's header edited after signing (another payload digest)"
    WRONG_LAYOUT = "an update of another layout (7 rows, not 6), declared as such"
    WRONG_TENSOR_SHAPE = "a header claiming the round's layout over tensors of another shape"
    NAN = "a NaN in the tensors"
    INF = "an inf in the tensors"
    OVERSIZED = "a header declaring a payload past the 256 MiB limit"
    BAD_DIGEST = "a payload that is not the one the header's sha256 names (same length)"


@dataclass(frozen=True)
class Expected:
    """How the aggregator must answer a fault."""

    reason: str
    on_header: bool  # refused from the header alone: the payload is never asked for
    recorded: bool = True  # a fed_rejections row (every fault is logged)


EXPECTED = {
    Fault.LATE: Expected(RejectReason.LATE, on_header=True),
    Fault.DUPLICATE: Expected(RejectReason.DUPLICATE, on_header=True),
    # No round is open under the header's (federation, round): the handler answers round_closed before any
    # RoundState sees the update (RoundState's WRONG_ROUND / WRONG_FEDERATION are for its direct callers); only a
    # round of a federation this node is in is recorded: another federation's id names nothing in its store.
    Fault.WRONG_ROUND: Expected(ROUND_CLOSED, on_header=True),
    Fault.WRONG_FEDERATION: Expected(ROUND_CLOSED, on_header=True, recorded=False),
    Fault.NOT_A_MEMBER: Expected(RejectReason.NOT_A_MEMBER, on_header=True),
    Fault.WRONG_SENDER: Expected(RejectReason.WRONG_SENDER, on_header=True),
    Fault.BAD_SIGNATURE: Expected(RejectReason.BAD_SIGNATURE, on_header=True),
    Fault.WRONG_LAYOUT: Expected(RejectReason.WRONG_SHAPE, on_header=True),
    Fault.WRONG_TENSOR_SHAPE: Expected(RejectReason.WRONG_SHAPE, on_header=False),
    Fault.NAN: Expected(RejectReason.NON_FINITE, on_header=False),
    Fault.INF: Expected(RejectReason.NON_FINITE, on_header=False),
    Fault.OVERSIZED: Expected(RejectReason.OVERSIZED, on_header=True),
    Fault.BAD_DIGEST: Expected(RejectReason.BAD_DIGEST, on_header=False),
}


# --- the round and its aggregator ----------------------------------------------------------------------------------


@dataclass
class Arena:
    """The aggregator's side: its identity, store (with the federation), open round and clock; and the members."""

    aggregator: Identity
    store: FederationStore
    fid: str
    state: RoundState
    clock: Clock
    first: Identity  # sends a good update before each fault
    sender: Identity  # sends the faults (a member with nothing accepted yet)
    outsider: Identity  # not a member
    root: Path

    def rows(self) -> list[RejectionRow]:
        return self.store.rejections(self.fid) + self.store.rejections(OTHER_FID)


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    aggregator, first, sender, bystander = (Identity.generate() for _ in range(4))
    descriptor = sign_descriptor(
        aggregator,
        name="finance-club",
        base_sha256="ab" * 32,
        adapter=AdapterConfig(rank=2, alpha=4, targets=("q_proj",)),
        privacy=Privacy(mode="dp", dp=DpParams(clip_norm=1.0, noise_multiplier=1.0)),
        created=int(NOW),
    )
    with FederationStore(tmp_path / "state.db", tmp_path / "federations") as store:
        fid = store.add_federation(descriptor, "creator").id
        clock = Clock()
        members = {n.fingerprint: n.public_key_b64() for n in (first, sender, bystander)}
        # As Aggregator.round builds it: the payload limit is the wire's (256 MiB).
        state = RoundState(fid, ROUND, members, 2, ROUND_DEADLINE, LAYOUT, "plain", fed_wire.MAX_PAYLOAD, clock=clock)
        yield Arena(aggregator, store, fid, state, clock, first, sender, Identity.generate(), tmp_path)


Send = Callable[..., Awaitable["Outcome"]]


@asynccontextmanager
async def update_stream(arena: Arena) -> AsyncIterator[Send]:
    """Run the aggregator (an UpdateCollector serving UPDATE_PROTOCOL, round 3 open) and each sending node's
    host (first, sender, outsider), connected on 127.0.0.1; yield `send(header, payload, via=None)`, which sends one
    update on a fresh stream from the node `via` names (by default the node of the member the header claims). The
    hosts stop on exit."""
    nodes = (arena.first, arena.sender, arena.outsider)
    async with AsyncExitStack() as stack:
        aggregator = await stack.enter_async_context(P2PNode(arena.aggregator, CFG))
        hosts = {n.fingerprint: await stack.enter_async_context(P2PNode(n, CFG)) for n in nodes}
        collector = UpdateCollector(arena.store, accepted=lambda fid: None)
        collector.open(arena.state)
        aggregator.set_stream_handler(fed_wire.UPDATE_PROTOCOL, collector.serve)
        for host in hosts.values():
            await host.connect(aggregator.listen_addrs[0])

        async def send(header: bytes, payload: bytes, via: Identity | None = None) -> Outcome:
            host = hosts[via.fingerprint if via is not None else claimed_member(header)]
            return await send_one(host, aggregator.peer_id, header, payload)

        yield send


@dataclass(frozen=True)
class Outcome:
    verdict: fed_wire.Verdict
    sent: tuple[str, ...]  # the data frames the member sent, in order


class Recorder:
    """The member's side of a stream, noting the message type of every data frame it sends."""

    def __init__(self, stream: Libp2pStream) -> None:
        self.stream = stream
        self.sent: list[str] = []

    async def read(self, n: int) -> bytes:
        return await self.stream.read(n)

    async def write(self, data: bytes) -> None:
        if len(data) == HEADER_SIZE and data.startswith(MAGIC):  # framing writes each frame header on its own
            header = decode_header(data)
            if header.kind is Kind.DATA:
                self.sent.append(header.msg_type)
        await self.stream.write(data)

    async def close(self) -> None:
        await self.stream.close()


async def send_one(member: P2PNode, peer: ID, header: bytes, payload: bytes) -> Outcome:
    """One update on a fresh stream, sent by the member's own code (`fed_wire.send_update`)."""
    stream = Recorder(await member.open_stream(peer, fed_wire.UPDATE_PROTOCOL))
    try:
        verdict = await fed_wire.send_update(stream, header, payload)
    finally:
        await stream.close()
    return Outcome(verdict, tuple(stream.sent))


# --- updates -------------------------------------------------------------------------------------------------------


def oversized_header(node: Identity, fid: str) -> bytes:
    """A header, properly signed, declaring one byte more than the wire's payload limit (no such payload exists)."""
    header = UpdateHeader(
        schema=UPDATE_SCHEMA,
        federation_id=fid,
        round=ROUND,
        member=node.fingerprint,
        layout=LAYOUT.digest(),
        kind="plain",
        payload_sha256="0" * 64,
        payload_len=fed_wire.MAX_PAYLOAD + 1,
    )
    return msgspec.json.encode(sign_struct(node, header))


def faulty(fault: Fault, arena: Arena) -> tuple[bytes, bytes]:
    """The header and payload of an update with `fault` (`arena.first` already has a good update accepted)."""
    fid, sender = arena.fid, arena.sender
    match fault:
        case Fault.LATE:  # the caller moves the clock past the deadline
            return signed_update(sender, fid=fid)
        case Fault.DUPLICATE:
            return signed_update(arena.first, encode_tensors(adapter(8)), fid=fid)
        case Fault.WRONG_ROUND:
            return signed_update(sender, fid=fid, round=ROUND - 1)
        case Fault.WRONG_FEDERATION:
            return signed_update(sender, fid=OTHER_FID)
        case Fault.NOT_A_MEMBER:
            return signed_update(arena.outsider, fid=fid)
        case Fault.WRONG_SENDER:  # the caller sends it from `first`'s node
            return signed_update(sender, fid=fid)
        case Fault.BAD_SIGNATURE:
            header, payload = signed_update(sender, fid=fid)
            return json.dumps(json.loads(header) | {"payload_sha256": "ab" * 32}).encode(), payload
        case Fault.WRONG_LAYOUT:
            other = adapter(rows=7)
            return signed_update(sender, encode_tensors(other), fid=fid, layout=Layout.of(other).digest())
        case Fault.WRONG_TENSOR_SHAPE:
            return signed_update(sender, encode_tensors(adapter(rows=5)), fid=fid)
        case Fault.NAN | Fault.INF:
            return signed_update(sender, non_finite(np.nan if fault is Fault.NAN else np.inf), fid=fid)
        case Fault.OVERSIZED:
            return oversized_header(sender, fid), b""  # never sent: the aggregator refuses on the header
        case Fault.BAD_DIGEST:
            return signed_update(sender, encode_tensors(adapter(9)), fid=fid, header_payload=encode_tensors(adapter(7)))
    raise AssertionError(fault)


async def inflict(fault: Fault, arena: Arena, send: Send) -> Outcome:
    """Send the update with `fault` (with the clock past the deadline if it is LATE, from `first`'s node if it is
    WRONG_SENDER)."""
    header, payload = faulty(fault, arena)
    if fault is Fault.LATE:
        arena.clock.now = ROUND_DEADLINE + 0.5
    try:
        return await send(header, payload, via=arena.first if fault is Fault.WRONG_SENDER else None)
    finally:
        arena.clock.now = NOW


def claimed_member(header: bytes) -> str:
    return str(json.loads(header)["member"])


def rejection_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == SERVICE_LOGGER and "rejected an update" in r.getMessage()
    ]


# --- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_a_bad_update_is_refused_over_the_stream_with_a_recorded_and_logged_reason(
    fault: Fault, arena: Arena, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange
    caplog.set_level(logging.INFO, logger=SERVICE_LOGGER)
    expected = EXPECTED[fault]
    header, _ = faulty(fault, arena)
    outcomes: dict[str, Outcome] = {}

    async def main() -> None:
        with trio.fail_after(DEADLINE_S):
            async with update_stream(arena) as send:
                outcomes["first"] = await send(*signed_update(arena.first, fid=arena.fid))
                # Act
                outcomes["fault"] = await inflict(fault, arena, send)

    trio.run(main)
    # Assert
    assert outcomes["first"].verdict == fed_wire.Verdict(accepted=True)
    verdict = outcomes["fault"].verdict
    assert not verdict.accepted and verdict.reason == expected.reason, f"{fault.value}: {verdict}"
    # a fault judged on the header is refused before its payload is asked for: the payload never leaves the member
    assert outcomes["fault"].sent == (("fed.header",) if expected.on_header else ("fed.header", "fed.payload"))
    assert arena.state.contributors() == [arena.first.fingerprint], "a refused update changed the round"
    rows, logs = arena.rows(), rejection_logs(caplog)
    r = ROUND - 1 if fault is Fault.WRONG_ROUND else ROUND
    assert len(logs) == 1 and f"rejected an update: {expected.reason}: round {r}: " in logs[0], logs
    if expected.recorded:
        # recorded under the node that sent it (the stream's authenticated peer), not the member its header names
        sent_by = arena.first.fingerprint if fault is Fault.WRONG_SENDER else claimed_member(header)
        assert [(row.federation, row.round, row.member, row.reason) for row in rows] == [
            (arena.fid, r, sent_by, expected.reason)
        ]
        claim = f"claimed to be from {claimed_member(header)}: " if sent_by != claimed_member(header) else ""
        assert rows[0].detail.startswith(f"{claim}round {r}: ") and rows[0].detail.removeprefix(claim)[:200] in (
            verdict.detail
        )
    else:
        assert rows == []
    # the round's own counter sees only the updates that reached it
    assert arena.state.rejections == ({} if expected.reason == ROUND_CLOSED else {expected.reason: 1})


def test_a_good_update_is_accepted_once_and_refused_updates_do_not_count(
    arena: Arena, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange
    caplog.set_level(logging.INFO, logger=SERVICE_LOGGER)
    first = signed_update(arena.first, fid=arena.fid)
    outcomes: dict[str, Outcome] = {}
    faults: dict[Fault, Outcome] = {}

    async def main() -> None:
        with trio.fail_after(DEADLINE_S):
            async with update_stream(arena) as send:
                # Act
                outcomes["first"] = await send(*first)
                outcomes["copy"] = await send(*first)  # the very same bytes again
                for fault in Fault:
                    faults[fault] = await inflict(fault, arena, send)
                outcomes["sender"] = await send(*signed_update(arena.sender, fid=arena.fid))

    trio.run(main)
    # Assert
    assert outcomes["first"].verdict == fed_wire.Verdict(accepted=True)
    assert outcomes["first"].sent == ("fed.header", "fed.payload")
    copy = outcomes["copy"].verdict
    assert (copy.accepted, copy.reason) == (False, RejectReason.DUPLICATE)
    assert outcomes["copy"].sent == ("fed.header",), "the copy's payload was asked for"
    assert {f: o.verdict.reason for f, o in faults.items()} == {f: e.reason for f, e in EXPECTED.items()}
    assert outcomes["sender"].verdict == fed_wire.Verdict(accepted=True), "refused updates counted as the sender's"
    assert arena.state.contributors() == sorted([arena.first.fingerprint, arena.sender.fingerprint])
    recorded = [RejectReason.DUPLICATE] + [e.reason for e in EXPECTED.values() if e.recorded]
    assert [r.reason for r in arena.rows()] == recorded
    assert len(rejection_logs(caplog)) == len(recorded) + 1  # the other federation's update is logged only
