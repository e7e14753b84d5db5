"""The aggregator's round state machine, the aggregator choice and the round notices.

Hivemind-style: every way an update can be bad is one `Fault`; each is rejected with exactly its reason and leaves
the accepted set as it was."""

import base64
import enum
import functools
import hashlib
import json
import random
import threading

import msgspec
import numpy as np
import pytest

from crypto.identity import Identity
from crypto.signed import sign_struct
from federation.messages import (
    Kind,
    MessageError,
    MessageReason,
    RoundOpen,
    members_digest,
    sign_aggregate_statement,
    sign_round_done,
    sign_round_open,
    verify_aggregate_statement,
    verify_round_done,
    verify_round_open,
    verify_update_header,
)
from federation.round import Accepted, CkksCheck, Decision, Rejected, RejectReason, RoundState, choose_aggregator
from federation.update import Layout, UpdateError, UpdateReason, encode_tensors
from tests.federation.updates import LAYOUT, adapter, non_finite, signed_update

NOW = 1_800_000_000.0
DEADLINE = NOW + 300
FID = hashlib.sha256(b"finance-club").hexdigest()
CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"


PAYLOAD_LIMIT = len(encode_tensors(adapter())) + 256


@pytest.fixture(scope="module")
def nodes() -> list[Identity]:
    return sorted((Identity.generate() for _ in range(4)), key=lambda i: i.fingerprint)


@pytest.fixture(scope="module")
def members(nodes: list[Identity]) -> dict[str, str]:
    return {n.fingerprint: n.public_key_b64() for n in nodes}


def new_state(
    members: dict[str, str], quorum: int = 2, kind: Kind = "plain", ckks_check: CkksCheck | None = None
) -> RoundState:
    return RoundState(FID, 3, members, quorum, DEADLINE, LAYOUT, kind, PAYLOAD_LIMIT, ckks_check, clock=lambda: NOW)


update = functools.partial(signed_update, fid=FID)


class Fault(enum.Enum):
    """Ways an update offered to the aggregator can be bad."""

    LATE = enum.auto()
    DUPLICATE = enum.auto()
    WRONG_ROUND = enum.auto()
    WRONG_FEDERATION = enum.auto()
    NOT_A_MEMBER = enum.auto()
    WRONG_LAYOUT = enum.auto()
    WRONG_TENSOR_SHAPE = enum.auto()
    NAN = enum.auto()
    INF = enum.auto()
    OVERSIZED = enum.auto()
    BAD_DIGEST = enum.auto()
    BAD_SIGNATURE = enum.auto()
    FORGED_MEMBER = enum.auto()
    WRONG_KIND = enum.auto()
    GARBAGE_PAYLOAD = enum.auto()
    GARBAGE_HEADER = enum.auto()


REASON = {
    Fault.LATE: RejectReason.LATE,
    Fault.DUPLICATE: RejectReason.DUPLICATE,
    Fault.WRONG_ROUND: RejectReason.WRONG_ROUND,
    Fault.WRONG_FEDERATION: RejectReason.WRONG_FEDERATION,
    Fault.NOT_A_MEMBER: RejectReason.NOT_A_MEMBER,
    Fault.WRONG_LAYOUT: RejectReason.WRONG_SHAPE,
    Fault.WRONG_TENSOR_SHAPE: RejectReason.WRONG_SHAPE,
    Fault.NAN: RejectReason.NON_FINITE,
    Fault.INF: RejectReason.NON_FINITE,
    Fault.OVERSIZED: RejectReason.OVERSIZED,
    Fault.BAD_DIGEST: RejectReason.BAD_DIGEST,
    Fault.BAD_SIGNATURE: RejectReason.BAD_SIGNATURE,
    Fault.FORGED_MEMBER: RejectReason.BAD_SIGNATURE,
    Fault.WRONG_KIND: RejectReason.WRONG_KIND,
    Fault.GARBAGE_PAYLOAD: RejectReason.MALFORMED,
    Fault.GARBAGE_HEADER: RejectReason.MALFORMED,
}


def faulty(fault: Fault, sender: Identity, first: Identity) -> tuple[bytes, bytes, float]:
    """Header bytes, payload and arrival time of an update with `fault` (`first` has already sent a good one)."""
    match fault:
        case Fault.LATE:
            return (*update(sender), DEADLINE + 0.5)
        case Fault.DUPLICATE:
            return (*update(first, encode_tensors(adapter(8))), NOW)
        case Fault.WRONG_ROUND:
            return (*update(sender, round=2), NOW)
        case Fault.WRONG_FEDERATION:
            return (*update(sender, fid="e" * 64), NOW)
        case Fault.NOT_A_MEMBER:
            return (*update(Identity.generate()), NOW)
        case Fault.WRONG_LAYOUT:
            return (*update(sender, encode_tensors(adapter(rows=7)), layout=Layout.of(adapter(rows=7)).digest()), NOW)
        case Fault.WRONG_TENSOR_SHAPE:  # the header claims the round's layout; the tensors do not have it
            return (*update(sender, encode_tensors(adapter(rows=5))), NOW)
        case Fault.NAN | Fault.INF:
            return (*update(sender, non_finite(np.nan if fault is Fault.NAN else np.inf)), NOW)
        case Fault.OVERSIZED:
            return (*update(sender, encode_tensors(adapter(7)) + b" " * PAYLOAD_LIMIT), NOW)
        case Fault.BAD_DIGEST:  # same length, other bytes
            return (*update(sender, encode_tensors(adapter(9)), header_payload=encode_tensors(adapter(7))), NOW)
        case Fault.BAD_SIGNATURE:
            header, payload = update(sender)
            return json.dumps(json.loads(header) | {"payload_sha256": "ab" * 32}).encode(), payload, NOW
        case Fault.FORGED_MEMBER:  # an outsider signs a header naming a member
            header, payload = update(Identity.generate())
            return json.dumps(json.loads(header) | {"member": sender.fingerprint}).encode(), payload, NOW
        case Fault.WRONG_KIND:
            return (*update(sender, kind="ckks"), NOW)
        case Fault.GARBAGE_PAYLOAD:
            return (*update(sender, b"\x80\x04garbage, not safetensors"), NOW)
        case Fault.GARBAGE_HEADER:
            return b'{"schema": "mirador.fed-update/v1"}', encode_tensors(adapter(7)), NOW
    raise AssertionError(fault)


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_a_bad_update_is_rejected_with_exactly_its_reason(
    nodes: list[Identity], members: dict[str, str], fault: Fault
) -> None:
    # Arrange
    state = new_state(members)
    first, sender = nodes[0], nodes[1]
    assert isinstance(state.receive(*update(first)), Accepted)
    header, payload, when = faulty(fault, sender, first)
    # Act
    outcome = state.receive(header, payload, now=when)
    # Assert
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason is REASON[fault], outcome
    assert [u.member for u in state.updates()] == [first.fingerprint]
    assert state.rejections == {REASON[fault]: 1}
    assert str(outcome).startswith(f"{REASON[fault].value}: round 3")


@pytest.mark.parametrize("fault", [f for f in Fault if f not in (Fault.LATE, Fault.DUPLICATE)], ids=lambda f: f.name)
def test_a_member_may_resend_a_good_update_after_a_rejected_one(
    nodes: list[Identity], members: dict[str, str], fault: Fault
) -> None:
    state = new_state(members)
    state.receive(*update(nodes[0]))
    state.receive(*faulty(fault, nodes[1], nodes[0])[:2])
    assert isinstance(state.receive(*update(nodes[1])), Accepted)
    assert state.contributors() == sorted([nodes[0].fingerprint, nodes[1].fingerprint])


def test_an_accepted_plain_update_carries_its_header_and_tensors(
    nodes: list[Identity], members: dict[str, str]
) -> None:
    state = new_state(members)
    header, payload = update(nodes[2])
    outcome = state.receive(header, payload)
    assert isinstance(outcome, Accepted)
    assert outcome.header == verify_update_header(header, members) and outcome.payload == payload
    assert outcome.tensors is not None
    np.testing.assert_array_equal(outcome.tensors["q_proj.lora_B.weight"], adapter(7)["q_proj.lora_B.weight"])


def test_the_header_alone_is_enough_to_refuse_an_oversized_update(
    nodes: list[Identity], members: dict[str, str]
) -> None:
    state = new_state(members)
    header, _ = update(nodes[1], b"x" * (PAYLOAD_LIMIT + 1))
    rejected = state.admit_header(verify_update_header(header, members))
    assert rejected is not None and rejected.reason is RejectReason.OVERSIZED
    assert state.admit_header(verify_update_header(update(nodes[1])[0], members)) is None


def test_a_header_declaring_its_own_weight_is_refused(nodes: list[Identity], members: dict[str, str]) -> None:
    # Arrange: a member signs a header claiming 10^9 examples (FedAvg weighed updates by that claim)
    state = new_state(members)
    header, payload = update(nodes[1])
    body = json.loads(header) | {"num_examples": 10**9}
    body.pop("signature")
    signature = base64.b64encode(nodes[1].sign(msgspec.json.encode(body, order="sorted"))).decode()
    claimed = json.dumps(body | {"signature": signature}).encode()

    # Act
    result = state.receive(claimed, payload, NOW)

    # Assert
    assert isinstance(result, Rejected) and result.reason is RejectReason.MALFORMED, result
    assert "num_examples" in result.detail and state.contributors() == []


def test_an_update_is_taken_only_from_the_node_of_the_member_who_signed_it(
    nodes: list[Identity], members: dict[str, str]
) -> None:
    # Arrange: nodes[1]'s update, as relayed by nodes[2] and as sent by nodes[1] itself
    state = new_state(members)
    header, payload = update(nodes[1])
    parsed = verify_update_header(header, members)
    # Act
    relayed = state.offer(parsed, payload, sender=nodes[2].public_key_b64())
    direct = state.offer(parsed, payload, sender=nodes[1].public_key_b64())
    # Assert
    assert isinstance(relayed, Rejected) and relayed.reason is RejectReason.WRONG_SENDER
    assert relayed.member == nodes[1].fingerprint
    assert isinstance(direct, Accepted)
    assert state.contributors() == [nodes[1].fingerprint]
    assert state.admit_header(verify_update_header(update(nodes[2])[0], members), sender=None) is None  # no claim


def test_ckks_updates_are_checked_by_kind_size_digest_and_the_callback(
    nodes: list[Identity], members: dict[str, str]
) -> None:
    def ckks_check(payload: bytes) -> None:
        if payload.startswith(b"short"):
            raise UpdateError(UpdateReason.WRONG_SHAPE, "2 ciphertexts, expected 3")
        if payload.startswith(b"boom"):
            raise RuntimeError("the parser fell over")
        if not payload.startswith(b"CKKS"):
            raise ValueError("not a serialized ciphertext")

    state = new_state(members, kind="ckks", ckks_check=ckks_check)
    accepted = state.receive(*update(nodes[0], b"CKKS" + bytes(64), kind="ckks"))
    assert isinstance(accepted, Accepted) and accepted.tensors is None
    outcomes = [state.receive(*update(nodes[1], p, kind="ckks")) for p in (b"short", b"boom", b"junk")]
    assert [o.reason for o in outcomes if isinstance(o, Rejected)] == [
        RejectReason.WRONG_SHAPE,
        RejectReason.MALFORMED,
        RejectReason.MALFORMED,
    ]
    plain = state.receive(*update(nodes[1]))
    assert isinstance(plain, Rejected) and plain.reason is RejectReason.WRONG_KIND


# --- decisions -----------------------------------------------------------------------------------------------------


def send(state: RoundState, nodes: list[Identity], count: int) -> None:
    for node in nodes[:count]:
        assert isinstance(state.receive(*update(node)), Accepted)


@pytest.mark.parametrize(
    "quorum, sent, when, decision",
    [
        (2, 0, NOW, Decision.WAIT),
        (2, 2, NOW, Decision.WAIT),  # quorum reached: wait for the others until the deadline
        (2, 4, NOW, Decision.AGGREGATE),  # everyone sent: no need to wait
        (2, 2, DEADLINE, Decision.WAIT),  # the deadline itself still accepts updates
        (2, 2, DEADLINE + 1, Decision.AGGREGATE),
        (3, 2, DEADLINE + 1, Decision.ABANDON),
        (2, 0, DEADLINE + 1, Decision.ABANDON),
    ],
)
def test_quorum_and_deadline_decide(
    nodes: list[Identity], members: dict[str, str], quorum: int, sent: int, when: float, decision: Decision
) -> None:
    state = new_state(members, quorum=quorum)
    send(state, nodes, sent)
    assert state.ready(when) is decision


def test_every_member_sending_below_quorum_abandons_at_once(nodes: list[Identity], members: dict[str, str]) -> None:
    two = dict(list(members.items())[:2])
    state = new_state(two, quorum=3)
    send(state, nodes, 2)
    assert state.ready(NOW) is Decision.ABANDON


def test_the_injected_clock_is_the_default_time(nodes: list[Identity], members: dict[str, str]) -> None:
    clock = [NOW]
    state = RoundState(FID, 3, members, 2, DEADLINE, LAYOUT, "plain", PAYLOAD_LIMIT, clock=lambda: clock[0])
    send(state, nodes, 2)
    assert state.ready() is Decision.WAIT
    clock[0] = DEADLINE + 1
    assert state.ready() is Decision.AGGREGATE
    late = state.receive(*update(nodes[3]))
    assert isinstance(late, Rejected) and late.reason is RejectReason.LATE


def test_a_closed_round_keeps_what_it_had_and_refuses_the_rest(nodes: list[Identity], members: dict[str, str]) -> None:
    # Arrange
    state = new_state(members)
    send(state, nodes, 2)
    # Act
    closed = state.close()
    late = state.receive(*update(nodes[3]))
    # Assert
    assert [a.member for a in closed] == state.contributors() == sorted(n.fingerprint for n in nodes[:2])
    assert isinstance(late, Rejected) and late.reason is RejectReason.LATE
    assert "already closed" in late.detail  # closed before its deadline: not "-300 s after the deadline"


def test_concurrent_copies_of_one_update_are_accepted_once(nodes: list[Identity], members: dict[str, str]) -> None:
    # Arrange: the same member's update on 8 streams at once (offer runs in worker threads); the payload check
    # holds every copy until all 8 passed the header checks, so each would be taken without the final re-check
    from concurrent.futures import ThreadPoolExecutor

    copies = 8
    barrier = threading.Barrier(copies, timeout=10)
    state = new_state(members, kind="ckks", ckks_check=lambda _: barrier.wait() and None)
    header_bytes, payload = update(nodes[1], b"CKKS" + bytes(64), kind="ckks")
    header = verify_update_header(header_bytes, members)
    # Act
    with ThreadPoolExecutor(copies) as pool:
        outcomes = list(pool.map(lambda _: state.offer(header, payload), range(copies)))
    # Assert
    assert sum(isinstance(o, Accepted) for o in outcomes) == 1
    assert all(o.reason is RejectReason.DUPLICATE for o in outcomes if isinstance(o, Rejected))
    assert state.rejections == {RejectReason.DUPLICATE: copies - 1}


def test_a_round_needs_a_quorum_of_two_and_members(members: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="quorum"):
        new_state(members, quorum=1)
    with pytest.raises(ValueError, match="members"):
        new_state({})


# --- aggregator choice ---------------------------------------------------------------------------------------------


def test_the_aggregator_choice_is_deterministic_and_ignores_member_order(members: dict[str, str]) -> None:
    names = list(members)
    shuffled = random.Random(5).sample(names, len(names))
    for round in range(1, 20):
        chosen = choose_aggregator(FID, round, names)
        assert chosen in names
        assert chosen == choose_aggregator(FID, round, shuffled) == choose_aggregator(FID, round, names + names[:1])


def test_the_aggregator_rotates_over_rounds(members: dict[str, str]) -> None:
    chosen = [choose_aggregator(FID, round, list(members)) for round in range(1, 41)]
    assert set(chosen) == set(members)
    other = [choose_aggregator("0" * 64, round, list(members)) for round in range(1, 41)]
    assert other != chosen
    with pytest.raises(ValueError):
        choose_aggregator(FID, 1, [])


# --- round notices and the aggregate statement ---------------------------------------------------------------------


def aggregator_of(round: int, nodes: list[Identity]) -> Identity:
    chosen = choose_aggregator(FID, round, [n.fingerprint for n in nodes])
    return next(n for n in nodes if n.fingerprint == chosen)


def test_round_open_verifies_from_the_rounds_aggregator(nodes: list[Identity], members: dict[str, str]) -> None:
    agg = aggregator_of(3, nodes)
    data = sign_round_open(
        agg, federation_id=FID, round=3, deadline=int(DEADLINE), global_round=2, global_cid=CID, members=members
    )
    notice = verify_round_open(data, FID, members)
    assert (notice.aggregator, notice.deadline, notice.global_cid) == (agg.fingerprint, DEADLINE, CID)
    assert notice.global_round == 2
    assert notice.members == members_digest(reversed(list(members)))
    first = sign_round_open(
        aggregator_of(1, nodes), federation_id=FID, round=1, deadline=1, global_cid="", members=members
    )
    assert verify_round_open(first, FID, members).global_cid == ""
    assert verify_round_open(first, FID, members).global_round == 0


def round_open_fault(fault: str, nodes: list[Identity], members: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    agg = aggregator_of(3, nodes)
    other = next(n for n in nodes if n is not agg)
    kwargs = {"federation_id": FID, "round": 3, "deadline": int(DEADLINE), "global_cid": CID, "members": members}
    good = sign_round_open(agg, **kwargs)  # type: ignore[arg-type]
    if fault == "wrong aggregator":
        return sign_round_open(other, **kwargs), members  # type: ignore[arg-type]
    if fault == "members differ":
        return good, dict(list(members.items())[:3]) | {Identity.generate().fingerprint: agg.public_key_b64()}
    if fault == "edited":
        return json.dumps(json.loads(good) | {"deadline": int(DEADLINE) + 3600}).encode(), members
    if fault == "other federation":
        return good, members
    if fault == "bad cid":
        return json.dumps(json.loads(good) | {"global_cid": "not-a-cid"}).encode(), members
    if fault == "global from the future":
        with pytest.raises(MessageError):  # the aggregator's own code refuses to sign it ...
            sign_round_open(agg, **kwargs, global_round=3)  # type: ignore[arg-type]
        future = msgspec.json.decode(good, type=RoundOpen)  # ... so a hostile one signs it by hand
        return msgspec.json.encode(sign_struct(agg, msgspec.structs.replace(future, global_round=3))), members
    return good + b" " * 4096, members


ROUND_OPEN_FAULTS = {
    "wrong aggregator": MessageReason.WRONG_AGGREGATOR,
    "members differ": MessageReason.MEMBERS_DIFFER,
    "edited": MessageReason.BAD_SIGNATURE,
    "other federation": MessageReason.WRONG_FEDERATION,
    "bad cid": MessageReason.MALFORMED,
    "global from the future": MessageReason.MALFORMED,
    "oversized": MessageReason.OVERSIZED,
}


@pytest.mark.parametrize("fault", list(ROUND_OPEN_FAULTS))
def test_a_bad_round_open_is_refused(nodes: list[Identity], members: dict[str, str], fault: str) -> None:
    data, view = round_open_fault(fault, nodes, members)
    with pytest.raises(MessageError) as info:
        verify_round_open(data, "d" * 64 if fault == "other federation" else FID, view)
    assert info.value.reason is ROUND_OPEN_FAULTS[fault]


def test_round_done_and_statement_verify_and_refuse_tampering(nodes: list[Identity], members: dict[str, str]) -> None:
    agg = aggregator_of(3, nodes)
    contributors = [n.fingerprint for n in nodes[:3]]
    done = sign_round_done(agg, federation_id=FID, round=3, aggregate_cid=CID, contributors=reversed(contributors))
    assert verify_round_done(done, FID, members).contributors == tuple(contributors)
    statement = sign_aggregate_statement(
        agg,
        federation_id=FID,
        round=3,
        strategy="fedavg",
        contributors=contributors,
        aggregate=b"agg",
        kind="plain",
        count=36,
    )
    verified = verify_aggregate_statement(statement, FID, members)
    assert verified.aggregate_sha256 == hashlib.sha256(b"agg").hexdigest() and verified.count == 36
    outsider = Identity.generate().fingerprint
    for data, verify in [(done, verify_round_done), (statement, verify_aggregate_statement)]:
        tampered = json.dumps(json.loads(data) | {"contributors": sorted([*contributors[:2], nodes[3].fingerprint])})
        with pytest.raises(MessageError) as info:
            verify(tampered.encode(), FID, members)
        assert info.value.reason is MessageReason.BAD_SIGNATURE
    forged = sign_round_done(agg, federation_id=FID, round=3, aggregate_cid=CID, contributors=[outsider])
    with pytest.raises(MessageError) as info:
        verify_round_done(forged, FID, members)
    assert info.value.reason is MessageReason.NOT_A_MEMBER
    many = [f"ed25519:{i:032x}" for i in range(65)]
    done_64 = sign_round_done(agg, federation_id=FID, round=3, aggregate_cid=CID, contributors=many[:64])
    assert len(done_64) <= 3584  # fits a 4 KiB node notice with its envelope
    with pytest.raises(MessageError) as info:
        sign_round_done(agg, federation_id=FID, round=3, aggregate_cid=CID, contributors=many)
    assert info.value.reason is MessageReason.MALFORMED
