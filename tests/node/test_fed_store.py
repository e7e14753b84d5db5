"""The federation store: federations, members, rounds and refused updates in state.db, HE keys as private files."""

import base64
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

import node.fed.store as fed_store
from crypto.identity import Identity
from crypto.signed import sign_struct
from federation.descriptor import (
    DescriptorError,
    JoinRequest,
    Member,
    sign_join,
    verify_descriptor,
    verify_join,
)
from node.core.home import NodeHome
from node.fed.store import (
    FederationStore,
    FederationStoreError,
    MemberConflictError,
    RoundStateError,
    StoredDescriptorError,
    UnknownFederationError,
)
from tests.federation_support import NOW, make_descriptor

X1 = base64.b64encode(bytes(range(32))).decode()
X2 = base64.b64encode(bytes(range(1, 33))).decode()
CID_A = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
CID_B = "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"


def join(descriptor: bytes, joiner: Identity, x25519: str = X1) -> tuple[Member, bytes]:
    """A member admitted by `verify_join` and its signed join request."""
    request = sign_join(joiner, verify_descriptor(descriptor).federation_id, x25519, now=NOW)
    return verify_join(verify_descriptor(descriptor), request, now=NOW), request


@pytest.fixture(scope="module")
def creator() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def descriptor(creator: Identity) -> bytes:
    return make_descriptor(creator)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FederationStore]:
    with FederationStore(tmp_path / "state.db", tmp_path / "federations") as opened:
        yield opened


def fid_of(descriptor: bytes) -> str:
    return verify_descriptor(descriptor).federation_id


# --- federations ---------------------------------------------------------------------------------------------------


def test_a_federation_is_stored_with_its_verified_descriptor(store: FederationStore, descriptor: bytes) -> None:
    row = store.add_federation(descriptor, "creator", now=NOW)
    assert row.id == fid_of(descriptor) and row.role == "creator" and row.active
    assert (row.name, row.creator, row.descriptor_bytes) == ("finance-club", row.descriptor.creator, descriptor)
    assert (row.joined_at, row.left_at, row.global_round, row.global_cid) == (NOW, None, 0, "")
    assert store.federation(row.id) == row
    assert store.add_federation(descriptor, "creator", now=NOW + 5) == row  # again: a no-op
    assert store.federation("ab" * 32) is None


def test_bad_descriptors_roles_and_ids_are_refused(store: FederationStore, descriptor: bytes) -> None:
    with pytest.raises(DescriptorError):
        store.add_federation(descriptor[:-3] + b"xx}", "member")
    with pytest.raises(FederationStoreError, match="role"):
        store.add_federation(descriptor, "owner")  # type: ignore[arg-type]
    store.add_federation(descriptor, "member")
    with pytest.raises(FederationStoreError, match="stored with role 'member'"):
        store.add_federation(descriptor, "creator")
    for bad in ("../../etc", "AB" * 32, "ab" * 31):
        with pytest.raises(FederationStoreError, match="64 lowercase hex"):
            store.federation(bad)
        with pytest.raises(FederationStoreError, match="64 lowercase hex"):
            store.save_he_secret(bad, b"x")


def test_federations_by_name_leave_and_rejoin(store: FederationStore, creator: Identity, descriptor: bytes) -> None:
    other_creator = make_descriptor(Identity.generate())
    other_name = make_descriptor(creator, name="health-club")
    first = store.add_federation(descriptor, "member", now=NOW)
    store.add_federation(other_creator, "member", now=NOW + 1)
    store.add_federation(other_name, "creator", now=NOW + 2)
    assert [r.id for r in store.by_name("finance-club")] == [first.id, fid_of(other_creator)]
    assert store.by_name("no-such-club") == []
    # Act
    assert store.leave(first.id, now=NOW + 10) is True
    assert store.leave(first.id) is False and store.leave("cd" * 32) is False
    # Assert
    assert [r.id for r in store.federations()] == [fid_of(other_creator), fid_of(other_name)]
    assert len(store.federations(active_only=False)) == 3
    assert [r.id for r in store.by_name("finance-club")] == [fid_of(other_creator)]
    left = store.by_name("finance-club", active_only=False)[0]
    assert left.left_at == NOW + 10 and not left.active
    again = store.add_federation(descriptor, "member", now=NOW + 20)
    assert again.active and again.joined_at == NOW + 20


def test_a_tampered_stored_descriptor_is_refused_on_read(
    tmp_path: Path, store: FederationStore, creator: Identity, descriptor: bytes
) -> None:
    fid = store.add_federation(descriptor, "member").id
    other = make_descriptor(creator, local_steps=7)
    other_id = store.add_federation(other, "member").id
    tampered = bytearray(descriptor)
    tampered[descriptor.index(b'"local_steps":') + 14] ^= 0x01  # 50 -> 40: still valid JSON, no longer signed
    raw = sqlite3.connect(tmp_path / "state.db")
    with raw:
        raw.execute("UPDATE fed_federations SET descriptor = ? WHERE id = ?", (bytes(tampered), fid))
        # a valid descriptor moved into another federation's row
        raw.execute("UPDATE fed_federations SET descriptor = ? WHERE id = ?", (descriptor, other_id))
    raw.close()
    # Act / Assert
    with pytest.raises(StoredDescriptorError, match="bad_signature"):
        store.federation(fid)
    with pytest.raises(StoredDescriptorError, match="does not match its row"):
        store.federation(other_id)
    assert store.federations() == [] and store.by_name("finance-club") == []


def test_the_global_model_only_moves_forward(store: FederationStore, descriptor: bytes) -> None:
    fid = store.add_federation(descriptor, "member").id
    store.set_global(fid, 3, CID_A)
    store.set_global(fid, 3, CID_A)  # the same again is fine
    with pytest.raises(RoundStateError, match="already applied round 3"):
        store.set_global(fid, 2, CID_B)
    with pytest.raises(RoundStateError):
        store.set_global(fid, 3, CID_B)
    with pytest.raises(FederationStoreError, match="round"):
        store.set_global(fid, 0, CID_B)
    with pytest.raises(UnknownFederationError):
        store.set_global("cd" * 32, 1, CID_A)
    store.set_global(fid, 4, CID_B)
    row = store.federation(fid)
    assert row is not None and (row.global_round, row.global_cid) == (4, CID_B)


# --- members -------------------------------------------------------------------------------------------------------


def test_members_are_stored_once_with_their_keys(store: FederationStore, descriptor: bytes) -> None:
    fid = store.add_federation(descriptor, "member").id
    alice, bob = Identity.generate(), Identity.generate()
    alice_member, alice_request = join(descriptor, alice)
    bob_member, bob_request = join(descriptor, bob, X2)
    # Act
    assert store.add_member(fid, alice_member, alice_request, now=NOW) is True
    assert store.add_member(fid, alice_member, alice_request, now=NOW + 1) is False
    assert store.add_member(fid, bob_member, bob_request, now=NOW) is True
    # Assert
    assert store.members(fid) == {alice.fingerprint: alice.public_key_b64(), bob.fingerprint: bob.public_key_b64()}
    rows = {r.fingerprint: r for r in store.member_rows(fid)}
    assert (rows[alice.fingerprint].x25519_b64, rows[alice.fingerprint].joined_at) == (X1, NOW)
    assert rows[bob.fingerprint].x25519_b64 == X2 and rows[bob.fingerprint].join_request == bob_request
    assert store.members("cd" * 32) == {}


def test_other_keys_and_foreign_join_requests_are_refused(
    store: FederationStore, creator: Identity, descriptor: bytes
) -> None:
    fid = store.add_federation(descriptor, "member").id
    other = make_descriptor(creator, name="other-club")
    store.add_federation(other, "member")
    alice, mallory = Identity.generate(), Identity.generate()
    member, request = join(descriptor, alice)
    store.add_member(fid, member, request)
    new_x25519 = join(descriptor, alice, X2)
    other_fed = join(other, alice)
    mallory_member, mallory_request = join(descriptor, mallory)
    posing = msgspec.structs.replace(mallory_member, fingerprint=alice.fingerprint)
    unsigned = msgspec.structs.replace(msgspec.json.decode(request, type=JoinRequest), signature="")
    mallory_signed = msgspec.structs.replace(
        msgspec.json.decode(request, type=JoinRequest), key=mallory.public_key_b64()
    )
    # Act / Assert
    with pytest.raises(MemberConflictError, match="stored with other keys"):
        store.add_member(fid, *new_x25519)
    with pytest.raises(MemberConflictError, match="does not match"):
        store.add_member(fid, *other_fed)  # a request for another federation
    with pytest.raises(MemberConflictError, match="does not match"):
        store.add_member(fid, posing, mallory_request)  # mallory's key under alice's fingerprint
    with pytest.raises(MemberConflictError, match="not the key of"):
        posing_member = msgspec.structs.replace(member, key=mallory.public_key_b64())
        store.add_member(fid, posing_member, msgspec.json.encode(sign_struct(mallory, mallory_signed)))
    with pytest.raises(MemberConflictError, match="not signed"):
        store.add_member(fid, member, msgspec.json.encode(unsigned))
    with pytest.raises(MemberConflictError, match="not a join request"):
        store.add_member(fid, member, b"{}")
    ghost = make_descriptor(creator, name="ghost-club")
    with pytest.raises(UnknownFederationError):
        store.add_member(fid_of(ghost), *join(ghost, mallory))
    assert store.members(fid) == {alice.fingerprint: alice.public_key_b64()}
    assert store.member_rows(fid)[0].x25519_b64 == X1


# --- rounds --------------------------------------------------------------------------------------------------------


def test_a_round_opens_once_and_ends_by_allowed_steps(store: FederationStore, descriptor: bytes) -> None:
    fid = store.add_federation(descriptor, "member").id
    agg = Identity.generate().fingerprint
    opened = store.open_round(fid, 1, agg, CID_A, now=NOW)
    assert (opened.status, opened.aggregator, opened.global_cid, opened.contributors) == ("open", agg, CID_A, ())
    assert store.open_round(fid, 1, agg, CID_A, now=NOW + 9) == opened  # gossip repeats: a no-op
    with pytest.raises(RoundStateError, match="already recorded"):
        store.open_round(fid, 1, "ed25519:" + "0" * 32, CID_A)
    # Act
    done = store.finish_round(fid, 1, "aggregated", aggregate_cid=CID_B, contributors=["a", "b"], now=NOW + 60)
    applied = store.finish_round(fid, 1, "applied", now=NOW + 70)
    # Assert: applying keeps what aggregation recorded
    assert (done.status, done.aggregate_cid, done.contributors, done.finished) == (
        "aggregated",
        CID_B,
        ("a", "b"),
        NOW + 60,
    )
    assert (applied.status, applied.aggregate_cid, applied.contributors, applied.finished) == (
        "applied",
        CID_B,
        ("a", "b"),
        NOW + 70,
    )
    with pytest.raises(RoundStateError, match="'applied'; it cannot become 'refused'"):
        store.finish_round(fid, 1, "refused")
    with pytest.raises(UnknownFederationError):
        store.finish_round("cd" * 32, 1, "abandoned")
    with pytest.raises(FederationStoreError, match="status"):
        store.finish_round(fid, 1, "open")
    with pytest.raises(UnknownFederationError):
        store.open_round("cd" * 32, 1, agg)


def test_a_round_first_seen_as_it_ends_is_recorded(store: FederationStore, descriptor: bytes) -> None:
    fid = store.add_federation(descriptor, "member").id
    # Act
    applied = store.finish_round(fid, 4, "applied", aggregate_cid=CID_A, contributors=["a"], aggregator="agg", now=NOW)
    abandoned = store.finish_round(fid, 5, "abandoned", reason="no RoundOpen by the deadline", now=NOW + 1)
    # Assert
    assert (applied.status, applied.aggregator, applied.aggregate_cid, applied.started, applied.finished) == (
        "applied",
        "agg",
        CID_A,
        NOW,
        NOW,
    )
    assert (abandoned.status, abandoned.aggregator, abandoned.reason) == (
        "abandoned",
        "",
        "no RoundOpen by the deadline",
    )
    last = store.last_round(fid)
    assert last is not None and last.round == 5


def test_rounds_are_listed_newest_first(store: FederationStore, descriptor: bytes) -> None:
    fid = store.add_federation(descriptor, "member").id
    assert store.last_round(fid) is None and store.rounds(fid) == []
    for number in (1, 2, 3):
        store.open_round(fid, number, "agg", now=NOW + number)
    store.finish_round(fid, 2, "abandoned", reason="quorum not reached: 1 of 3")
    store.finish_round(fid, 3, "refused", reason="bad statement")
    # Act
    rounds = store.rounds(fid, limit=2)
    last = store.last_round(fid)
    # Assert
    assert [(r.round, r.status, r.reason) for r in rounds] == [
        (3, "refused", "bad statement"),
        (2, "abandoned", "quorum not reached: 1 of 3"),
    ]
    assert last is not None and last.round == 3 and store.rounds(fid)[-1].status == "open"


def test_refused_updates_are_logged_and_capped(
    store: FederationStore, descriptor: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fed_store, "KEEP_REJECTIONS", 5)
    fid = store.add_federation(descriptor, "member").id
    other = "cd" * 32
    for i in range(8):
        store.reject(fid, 1, f"m{i}", "late", "x" * 5000 if i == 7 else f"update {i}", now=NOW + i)
    store.reject(other, 2, "m9", "bad_signature")
    # Act
    rows = store.rejections(fid)
    # Assert: the newest 5 rows of all kept, oldest first; the detail is cut
    assert [r.member for r in rows] == ["m4", "m5", "m6", "m7"]
    assert rows[0].detail == "update 4" and len(rows[-1].detail) == fed_store.MAX_DETAIL_CHARS
    assert (rows[0].reason, rows[0].round, rows[0].time) == ("late", 1, NOW + 4)
    assert [r.member for r in store.rejections(fid, limit=2)] == ["m6", "m7"]
    assert [r.reason for r in store.rejections(other)] == ["bad_signature"]


# --- persistence, files --------------------------------------------------------------------------------------------


def test_reopening_keeps_everything(tmp_path: Path, descriptor: bytes) -> None:
    home = NodeHome(tmp_path / "home")
    home.ensure()
    alice = Identity.generate()
    with FederationStore.for_home(home) as first:
        fid = first.add_federation(descriptor, "creator", now=NOW).id
        first.add_member(fid, *join(descriptor, alice))
        first.open_round(fid, 1, alice.fingerprint)
        first.finish_round(fid, 1, "applied", aggregate_cid=CID_A, contributors=[alice.fingerprint])
        first.set_global(fid, 1, CID_A)
        first.reject(fid, 1, "m", "late")
        first.save_he_secret(fid, b"secret")
        first.save_he_public(fid, b"public")
        before = (first.federation(fid), first.member_rows(fid), first.rounds(fid), first.rejections(fid))
    # Act
    with FederationStore.for_home(home) as second:
        after = (second.federation(fid), second.member_rows(fid), second.rounds(fid), second.rejections(fid))
        keys = (second.he_secret(fid), second.he_public(fid))
    # Assert
    assert after == before and before[0] is not None and before[0].global_cid == CID_A
    assert keys == (b"secret", b"public")
    assert (home.root / "federations" / fid / "he_secret.bin").is_file()


def test_files_are_private(tmp_path: Path, descriptor: bytes) -> None:
    db = tmp_path / "state.db"
    db.touch(mode=0o644)
    os.chmod(db, 0o644)
    old_umask = os.umask(0)
    try:
        with FederationStore(db, tmp_path / "federations") as store:
            fid = store.add_federation(descriptor, "member").id
            assert store.he_secret(fid) is None and store.he_public(fid) is None
            secret = store.save_he_secret(fid, b"s1")
            store.save_he_secret(fid, b"s2")  # replaced atomically
            public = store.save_he_public(fid, b"p")
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()}
            folders = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_dir()}
            assert store.he_secret(fid) == b"s2"
    finally:
        os.umask(old_umask)
    assert modes["state.db"] == 0o600 and modes["state.db-wal"] == 0o600
    assert (modes[secret.name], modes[public.name]) == (0o600, 0o644)
    assert folders == {"federations": 0o700, fid: 0o700}
    assert sorted(p.name for p in secret.parent.iterdir()) == ["he_public.bin", "he_secret.bin"]  # no temp files
