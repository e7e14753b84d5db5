"""Federation descriptors, invite tokens and join requests: signed, verified, and refused with a reason when
tampered with, forged, inconsistent, expired or aimed at someone else."""

import base64
import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from crypto.identity import Identity
from crypto.signed import sign_struct
from federation.descriptor import (
    MAX_DESCRIPTOR_BYTES,
    AdapterConfig,
    DescriptorError,
    DpParams,
    FederationDescriptor,
    FederationReason,
    HeParams,
    InviteError,
    JoinError,
    JoinRequest,
    LocalDpSgd,
    Privacy,
    StrategySpec,
    check_invite,
    descriptor_key,
    issue_invite,
    sign_descriptor,
    sign_join,
    verify_descriptor,
    verify_join,
)

NOW = 1_800_000_000
BASE = "ab" * 32
X25519 = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(scope="module")
def creator() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def joiner() -> Identity:
    return Identity.generate()


def full_kwargs(**over: Any) -> dict[str, Any]:
    """Arguments of a descriptor using every optional part (HE + DP, local DP-SGD, strategy params)."""
    kwargs: dict[str, Any] = {
        "name": "finance-club",
        "base_sha256": BASE,
        "adapter": AdapterConfig(rank=8, alpha=16, targets=("v_proj", "q_proj"), freeze_a=True),
        "privacy": Privacy(
            mode="he+dp-user",
            dp=DpParams(
                clip_norm=1.0,
                noise_multiplier=0.8,
                local_dp_sgd=LocalDpSgd(epsilon=4.0, delta=1e-6, max_grad_norm=1.0),
            ),
            he=HeParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 60), global_scale_bits=40),
        ),
        "strategy": StrategySpec(name="fedavg"),
        "quorum": 3,
        "min_members": 4,
        "round_deadline_s": 900,
        "local_steps": 40,
        "epsilon_budget": 10.0,
        "admission": "invite",
        "created": NOW,
    }
    return kwargs | over


def dp_privacy(noise: float = 1.0) -> Privacy:
    return Privacy(mode="dp", dp=DpParams(clip_norm=1.0, noise_multiplier=noise))


@pytest.fixture(scope="module")
def signed(creator: Identity) -> bytes:
    return sign_descriptor(creator, **full_kwargs())


@pytest.fixture(scope="module")
def descriptor(signed: bytes) -> FederationDescriptor:
    return verify_descriptor(signed)


def resign(identity: Identity, body: dict[str, Any]) -> bytes:
    """Sign `body` as a descriptor without `sign_descriptor`'s consistency checks (what a careless creator could do)."""
    body = {k: v for k, v in body.items() if k != "signature"}
    return msgspec.json.encode(sign_struct(identity, msgspec.convert(body, FederationDescriptor)))


# --- sign and verify -----------------------------------------------------------------------------------------------


def test_a_signed_descriptor_verifies_with_its_fields(creator: Identity, descriptor: FederationDescriptor) -> None:
    assert descriptor.creator == creator.fingerprint
    assert descriptor.adapter.targets == ("q_proj", "v_proj")  # sorted by the signer
    assert descriptor.adapter.alpha == 16.0
    assert descriptor.privacy.dp.delta == 1e-5
    assert descriptor.uses_he and descriptor.uses_dp
    assert descriptor.strategy == StrategySpec(name="fedavg", params={})


def test_the_federation_id_is_stable_and_names_the_content(creator: Identity, descriptor: FederationDescriptor) -> None:
    again = verify_descriptor(sign_descriptor(creator, **full_kwargs()))
    other = verify_descriptor(sign_descriptor(creator, **full_kwargs(local_steps=41)))
    assert len(descriptor.federation_id) == 64
    assert again.federation_id == descriptor.federation_id
    assert other.federation_id != descriptor.federation_id


def test_a_descriptor_signed_before_ffa_lora_keeps_its_signature_and_means_a_plus_b(creator: Identity) -> None:
    # Arrange: the bytes a node signed before AdapterConfig had freeze_a (the field absent)
    kwargs = full_kwargs(adapter=AdapterConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")))
    old = sign_descriptor(creator, **kwargs)
    # Act
    body = json.loads(old)
    verified = verify_descriptor(old)
    # Assert: nothing new in the signed bytes, A+B; the FFA one names freeze_a and is another federation
    assert "freeze_a" not in body["adapter"] and verified.adapter.freeze_a is False
    ffa = verify_descriptor(sign_descriptor(creator, **full_kwargs()))
    assert ffa.adapter.freeze_a is True and ffa.federation_id != verified.federation_id


def test_the_dht_key_fits_py_libp2p_walks_and_is_checked(creator: Identity, signed: bytes) -> None:
    key = descriptor_key("finance-club", creator.fingerprint)
    assert key.startswith("/mirador-fed/") and len(key.encode()) <= 50
    assert key == descriptor_key("finance-club", creator.fingerprint) != descriptor_key("other", creator.fingerprint)
    verify_descriptor(signed, key)
    with pytest.raises(DescriptorError) as info:
        verify_descriptor(signed, descriptor_key("other", creator.fingerprint))
    assert info.value.reason is FederationReason.WRONG_DHT_KEY


def leaf_paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a leaf of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaf_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaf_paths(item, (*path, index))
    else:
        yield path


LITERAL_SWAPS: dict[Any, Any] = {
    "dp": "he",
    "he+dp": "dp",
    "he+dp-user": "he+dp",
    "open": "invite",
    "invite": "open",
    8192: 16384,
}


def edited(value: Any, other_key: str) -> Any:
    """A different value of the same JSON type that still passes the field's own constraints."""
    if value in LITERAL_SWAPS and not isinstance(value, float):
        return LITERAL_SWAPS[value]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1 if value < 60 or value > 100 else value - 1
    if isinstance(value, float):
        return value / 2
    if value.startswith("ed25519:"):
        return "ed25519:" + "0" * 32
    if len(value) == 44 and value.endswith("="):
        return other_key
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:-1] + ("0" if value[-1] != "0" else "1")
    return value[:-1] + ("x" if value[-1] != "x" else "y")


def expected_reason(path: tuple[Any, ...]) -> FederationReason:
    return {
        "schema": FederationReason.SCHEMA,
        "creator": FederationReason.KEY_MISMATCH,
        "creator_key": FederationReason.KEY_MISMATCH,
    }.get(path[0], FederationReason.BAD_SIGNATURE)


def test_every_field_edited_under_the_old_signature_is_refused(signed: bytes, joiner: Identity) -> None:
    body = json.loads(signed)
    paths = [p for p in leaf_paths(body) if p != ("signature",)]
    assert len(paths) == 30
    # update_encoding is left out when "f32" (an HE descriptor's only one); added under the old signature: below
    assert {p[0] for p in paths} == set(FederationDescriptor.__struct_fields__) - {"signature", "update_encoding"}
    for path in paths:
        tampered = copy.deepcopy(body)
        parent = tampered
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = edited(parent[path[-1]], joiner.public_key_b64())
        with pytest.raises(DescriptorError) as info:
            verify_descriptor(json.dumps(tampered).encode())
        assert info.value.reason is expected_reason(path), (path, info.value)


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda b: b.pop("signature"), FederationReason.BAD_SIGNATURE),
        (lambda b: b.update(signature=base64.b64encode(b"\0" * 64).decode()), FederationReason.BAD_SIGNATURE),
        (lambda b: b.update(signature="not base64!"), FederationReason.BAD_SIGNATURE),
        (lambda b: b.update(extra=1), FederationReason.MALFORMED),
        (lambda b: b["privacy"]["dp"].pop("local_dp_sgd"), FederationReason.BAD_SIGNATURE),
        (lambda b: b["privacy"].pop("he"), FederationReason.BAD_SIGNATURE),
        (lambda b: b["adapter"].update(rank="8"), FederationReason.MALFORMED),
        (lambda b: b.update(quorum=True), FederationReason.MALFORMED),
        (lambda b: b.update(update_encoding="q8"), FederationReason.BAD_SIGNATURE),
        (lambda b: b.update(update_encoding="q4"), FederationReason.MALFORMED),
    ],
    ids=[
        "unsigned",
        "zero-signature",
        "bad-base64",
        "unknown-field",
        "dropped-dp-sgd",
        "dropped-he",
        "str",
        "bool",
        "added-q8",
        "unknown-encoding",
    ],
)
def test_a_forged_or_malformed_descriptor_is_refused(
    signed: bytes, edit: Callable[[dict[str, Any]], object], reason: FederationReason
) -> None:
    body = json.loads(signed)
    edit(body)
    with pytest.raises(DescriptorError) as info:
        verify_descriptor(json.dumps(body).encode())
    assert info.value.reason is reason


def test_garbage_and_oversized_descriptors_are_refused(signed: bytes) -> None:
    for data, reason in [
        (b"\xff not json", FederationReason.MALFORMED),
        (b"[]", FederationReason.MALFORMED),
        (signed[:-1] + b" " * MAX_DESCRIPTOR_BYTES + b"}", FederationReason.OVERSIZED),
    ]:
        with pytest.raises(DescriptorError) as info:
            verify_descriptor(data)
        assert info.value.reason is reason


def test_a_descriptor_of_another_schema_version_is_refused(creator: Identity, signed: bytes) -> None:
    body = json.loads(signed) | {"schema": "mirador.federation/v2"}
    with pytest.raises(DescriptorError) as info:
        verify_descriptor(resign(creator, body))
    assert info.value.reason is FederationReason.SCHEMA


# --- privacy and consistency ----------------------------------------------------------------------------------------


def test_plain_dp_and_he_only_descriptors_verify(creator: Identity) -> None:
    dp = verify_descriptor(sign_descriptor(creator, **full_kwargs(privacy=dp_privacy())))
    he_only = Privacy(mode="he", dp=DpParams(clip_norm=2.0, noise_multiplier=0.0), he=HeParams())
    he = verify_descriptor(sign_descriptor(creator, **full_kwargs(privacy=he_only)))
    assert (dp.uses_dp, dp.uses_he, he.uses_dp, he.uses_he) == (True, False, False, True)
    assert he.privacy.he == HeParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40), global_scale_bits=40)


INCONSISTENT: dict[str, dict[str, Any]] = {
    "dp without noise": {"privacy": dp_privacy(noise=0.0)},
    "he+dp without noise": {
        "privacy": Privacy(mode="he+dp", dp=DpParams(clip_norm=1.0, noise_multiplier=0.0), he=HeParams())
    },
    "he without he params": {"privacy": Privacy(mode="he", dp=DpParams(clip_norm=1.0, noise_multiplier=0.0))},
    "dp with he params": {
        "privacy": Privacy(mode="dp", dp=DpParams(clip_norm=1.0, noise_multiplier=1.0), he=HeParams())
    },
    "he with another strategy": {"strategy": StrategySpec(name="fedmedian")},
    "unknown strategy": {"strategy": StrategySpec(name="fedprox", params={"mu": 0.01})},
    "strategy parameter it does not take": {"strategy": StrategySpec(name="fedavg", params={"server_lr": 1.0})},
    "coefficient bits over the N=8192 bound": {
        "privacy": Privacy(
            mode="he",
            dp=DpParams(clip_norm=1.0, noise_multiplier=0.0),
            he=HeParams(coeff_mod_bit_sizes=(60, 40, 40, 40, 60)),
        )
    },
    "scale without headroom": {
        "privacy": Privacy(
            mode="he", dp=DpParams(clip_norm=1.0, noise_multiplier=0.0), he=HeParams(global_scale_bits=60)
        )
    },
    "min_members below quorum": {"quorum": 5, "min_members": 4},
    "duplicate targets": {"adapter": AdapterConfig(rank=8, alpha=16, targets=("q_proj", "q_proj"))},
}


@pytest.mark.parametrize("change", list(INCONSISTENT.values()), ids=list(INCONSISTENT))
def test_inconsistent_parameters_are_neither_signed_nor_accepted(creator: Identity, change: dict[str, Any]) -> None:
    with pytest.raises(DescriptorError) as info:
        sign_descriptor(creator, **full_kwargs(**change))
    assert info.value.reason is FederationReason.INCONSISTENT
    draft = json.loads(sign_descriptor(creator, **full_kwargs()))
    for key, value in change.items():
        draft[key] = msgspec.to_builtins(value)
    with pytest.raises(DescriptorError) as info:
        verify_descriptor(resign(creator, draft))
    assert info.value.reason is FederationReason.INCONSISTENT


def test_unsorted_targets_signed_by_hand_are_refused(creator: Identity, signed: bytes) -> None:
    body = json.loads(signed)
    body["adapter"]["targets"] = ["v_proj", "q_proj"]
    with pytest.raises(DescriptorError, match="not sorted") as info:
        verify_descriptor(resign(creator, body))
    assert info.value.reason is FederationReason.INCONSISTENT


OUT_OF_RANGE: dict[str, dict[str, Any]] = {
    "bad name": {"name": "Finance Club"},
    "bad base digest": {"base_sha256": "AB" * 32},
    "rank 0": {"adapter": AdapterConfig(rank=0, alpha=16, targets=("q_proj",))},
    "rank 257": {"adapter": AdapterConfig(rank=257, alpha=16, targets=("q_proj",))},
    "no targets": {"adapter": AdapterConfig(rank=8, alpha=16, targets=())},
    "bad target": {"adapter": AdapterConfig(rank=8, alpha=16, targets=("q proj",))},
    "zero clip": {"privacy": Privacy(mode="dp", dp=DpParams(clip_norm=0.0, noise_multiplier=1.0))},
    "NaN clip": {"privacy": Privacy(mode="dp", dp=DpParams(clip_norm=float("nan"), noise_multiplier=1.0))},
    "negative noise": {"privacy": dp_privacy(noise=-1.0)},
    "quorum 1": {"quorum": 1},
    "zero deadline": {"round_deadline_s": 0},
    "zero local steps": {"local_steps": 0},
    "too many local steps": {"local_steps": 10_001},
    "zero budget": {"epsilon_budget": 0.0},
    "infinite budget": {"epsilon_budget": float("inf")},
    "bad admission": {"admission": "closed"},
    "bad strategy param": {"strategy": StrategySpec(params={"Mu": 1.0})},
}


@pytest.mark.parametrize("change", list(OUT_OF_RANGE.values()), ids=list(OUT_OF_RANGE))
def test_out_of_range_fields_are_not_signed(creator: Identity, change: dict[str, Any]) -> None:
    with pytest.raises(DescriptorError) as info:
        sign_descriptor(creator, **full_kwargs(**change))
    assert info.value.reason is FederationReason.MALFORMED


# --- invite tokens -------------------------------------------------------------------------------------------------


def test_an_invite_admits_its_invitee_and_a_bearer_token_anyone(
    creator: Identity, joiner: Identity, descriptor: FederationDescriptor
) -> None:
    named = issue_invite(creator, descriptor.federation_id, joiner.fingerprint, ttl_s=3600, now=NOW)
    bearer = issue_invite(creator, descriptor.federation_id, "*", ttl_s=3600, now=NOW)
    assert check_invite(descriptor, named, joiner.fingerprint, NOW + 10).invitee == joiner.fingerprint
    token = check_invite(descriptor, bearer, Identity.generate().fingerprint, NOW + 10)
    assert token.invitee == "*" and len(token.nonce) == 32
    assert token.nonce != check_invite(descriptor, named, joiner.fingerprint, NOW).nonce


def bad_invite(fault: str, creator: Identity, joiner: Identity, descriptor: FederationDescriptor) -> bytes:
    fid = descriptor.federation_id
    if fault == "expired":
        return issue_invite(creator, fid, joiner.fingerprint, ttl_s=60, now=NOW - 120)
    if fault == "other federation":
        return issue_invite(creator, "0" * 64, joiner.fingerprint, ttl_s=3600, now=NOW)
    if fault == "other invitee":
        return issue_invite(creator, fid, Identity.generate().fingerprint, ttl_s=3600, now=NOW)
    if fault == "forged":
        return issue_invite(joiner, fid, joiner.fingerprint, ttl_s=3600, now=NOW)
    if fault == "edited":
        body = json.loads(issue_invite(creator, fid, Identity.generate().fingerprint, ttl_s=3600, now=NOW))
        return json.dumps(body | {"invitee": joiner.fingerprint}).encode()
    if fault == "oversized":
        return b" " * 2048
    return b"{}"


INVITE_FAULTS = {
    "expired": FederationReason.EXPIRED,
    "other federation": FederationReason.OTHER_FEDERATION,
    "other invitee": FederationReason.OTHER_INVITEE,
    "forged": FederationReason.NOT_CREATOR,
    "edited": FederationReason.NOT_CREATOR,
    "oversized": FederationReason.OVERSIZED,
    "malformed": FederationReason.MALFORMED,
}


@pytest.mark.parametrize("fault", list(INVITE_FAULTS))
def test_a_bad_invite_is_refused_with_its_reason(
    creator: Identity, joiner: Identity, descriptor: FederationDescriptor, fault: str
) -> None:
    token = bad_invite(fault, creator, joiner, descriptor)
    with pytest.raises(InviteError) as info:
        check_invite(descriptor, token, joiner.fingerprint, NOW)
    assert info.value.reason is INVITE_FAULTS[fault]


# --- join requests -------------------------------------------------------------------------------------------------


def test_an_invited_node_joins_with_its_keys(
    creator: Identity, joiner: Identity, descriptor: FederationDescriptor
) -> None:
    invite = issue_invite(creator, descriptor.federation_id, joiner.fingerprint, ttl_s=3600, now=NOW)
    member = verify_join(descriptor, sign_join(joiner, descriptor.federation_id, X25519, invite, now=NOW), now=NOW + 5)
    assert (member.fingerprint, member.key, member.x25519) == (joiner.fingerprint, joiner.public_key_b64(), X25519)
    assert member.joined == NOW and member.invite_nonce == json.loads(invite)["nonce"]


def test_an_open_federation_and_the_creator_need_no_invite(
    creator: Identity, joiner: Identity, descriptor: FederationDescriptor
) -> None:
    open_fed = verify_descriptor(sign_descriptor(creator, **full_kwargs(admission="open")))
    assert verify_join(open_fed, sign_join(joiner, open_fed.federation_id, X25519, now=NOW), NOW).invite_nonce == ""
    assert verify_join(descriptor, sign_join(creator, descriptor.federation_id, X25519, now=NOW), NOW)


def bad_join(fault: str, creator: Identity, joiner: Identity, descriptor: FederationDescriptor) -> bytes:
    fid = descriptor.federation_id
    invite = issue_invite(creator, fid, joiner.fingerprint, ttl_s=3600, now=NOW)
    good = json.loads(sign_join(joiner, fid, X25519, invite, now=NOW))
    if fault == "no invite":
        return sign_join(joiner, fid, X25519, now=NOW)
    if fault == "expired invite":
        return sign_join(joiner, fid, X25519, issue_invite(creator, fid, "*", ttl_s=1, now=NOW - 60), now=NOW)
    if fault == "someone else's invite":
        return sign_join(Identity.generate(), fid, X25519, invite, now=NOW)
    if fault == "other federation":
        return sign_join(joiner, "1" * 64, X25519, invite, now=NOW)
    if fault == "stale":
        return sign_join(joiner, fid, X25519, invite, now=NOW - 3600)
    if fault == "edited":
        return json.dumps(good | {"x25519": base64.b64encode(b"\1" * 32).decode()}).encode()
    if fault == "key not the joiner":
        return json.dumps(good | {"key": creator.public_key_b64()}).encode()
    if fault == "short x25519":
        return sign_join(joiner, fid, base64.b64encode(b"\0" * 31).decode().ljust(44, "="), invite, now=NOW)
    garbled = msgspec.convert(good | {"invite": "%%%", "signature": ""}, JoinRequest)
    return msgspec.json.encode(sign_struct(joiner, garbled))


JOIN_FAULTS = {
    "no invite": FederationReason.INVITE_REQUIRED,
    "expired invite": FederationReason.EXPIRED,
    "someone else's invite": FederationReason.OTHER_INVITEE,
    "other federation": FederationReason.OTHER_FEDERATION,
    "stale": FederationReason.STALE,
    "edited": FederationReason.BAD_SIGNATURE,
    "key not the joiner": FederationReason.KEY_MISMATCH,
    "short x25519": FederationReason.MALFORMED,
    "garbled invite": FederationReason.MALFORMED,
}


@pytest.mark.parametrize("fault", list(JOIN_FAULTS))
def test_a_bad_join_request_is_refused_with_its_reason(
    creator: Identity, joiner: Identity, descriptor: FederationDescriptor, fault: str
) -> None:
    data = bad_join(fault, creator, joiner, descriptor)
    with pytest.raises(JoinError) as info:
        verify_join(descriptor, data, now=NOW)
    assert info.value.reason is JOIN_FAULTS[fault], info.value


def test_a_join_request_carries_the_role_and_stays_verifiable_in_member_lists(
    creator: Identity, joiner: Identity, descriptor: FederationDescriptor
) -> None:
    # Arrange: an invited aggregator-only joiner; the member list is read again after its invite expired
    from federation.descriptor import verify_admitted

    fid = descriptor.federation_id
    invite = issue_invite(creator, fid, joiner.fingerprint, ttl_s=600, now=NOW)
    aggregator = sign_join(joiner, fid, X25519, invite=invite, now=NOW, role="aggregator")
    # Act
    now_member = verify_join(descriptor, aggregator, now=NOW + 5)
    later = verify_admitted(descriptor, aggregator)
    # Assert
    assert now_member.role == later.role == "aggregator"
    with pytest.raises(JoinError) as stale:
        verify_join(descriptor, aggregator, now=NOW + 3600)
    assert stale.value.reason is FederationReason.STALE  # a fresh join must be recent; an admitted member stays valid
    with pytest.raises(JoinError):
        sign_join(joiner, fid, X25519, now=NOW, role="boss")


# --- admissions: a member is who the creator admitted, by the creator's clock -----------------------------------------


def test_a_back_dated_request_with_an_expired_bearer_invite_is_no_member(
    creator: Identity, descriptor: FederationDescriptor
) -> None:
    # Arrange: a `*` invite valid for 10 minutes at NOW; an hour later mallory signs a request dated NOW + 60
    from federation.descriptor import sign_admission, verify_admission

    fid = descriptor.federation_id
    mallory = Identity.generate()
    invite = issue_invite(creator, fid, "*", ttl_s=600, now=NOW)
    back_dated = sign_join(mallory, fid, X25519, invite=invite, now=NOW + 60)
    self_admitted = sign_admission(mallory, descriptor, back_dated, now=NOW + 60)
    honest = sign_join(creator, fid, X25519, now=NOW)
    other_admission = sign_admission(creator, descriptor, honest, now=NOW)

    # Act / Assert: the creator, judging now, refuses it; nobody can stand in for the creator's admission
    with pytest.raises(JoinError) as at_creator:
        verify_join(descriptor, back_dated, now=NOW + 3600)
    assert at_creator.value.reason is FederationReason.STALE
    with pytest.raises(JoinError) as forged:
        verify_admission(descriptor, back_dated, self_admitted)
    assert forged.value.reason is FederationReason.NOT_CREATOR
    with pytest.raises(JoinError) as borrowed:
        verify_admission(descriptor, back_dated, other_admission)
    assert borrowed.value.reason is FederationReason.INCONSISTENT
    with pytest.raises(JoinError) as late:  # the creator's clock is the admission time: its invite had expired
        verify_admission(descriptor, back_dated, sign_admission(creator, descriptor, back_dated, now=NOW + 3600))
    assert late.value.reason in (FederationReason.STALE, FederationReason.EXPIRED)


def test_an_admission_by_the_creator_makes_a_member_at_the_creators_time(
    creator: Identity, joiner: Identity, descriptor: FederationDescriptor
) -> None:
    from federation.descriptor import sign_admission, verify_admission

    fid = descriptor.federation_id
    invite = issue_invite(creator, fid, joiner.fingerprint, ttl_s=600, now=NOW)
    request = sign_join(joiner, fid, X25519, invite=invite, now=NOW + 5, role="aggregator")

    member = verify_admission(descriptor, request, sign_admission(creator, descriptor, request, now=NOW + 10))

    assert (member.fingerprint, member.role) == (joiner.fingerprint, "aggregator")
