"""The creator's side of joining, with a real FederationStore (issue 14, finding 6): an invite admits one node, once;
the creator signs what it admitted, and every other node takes members only with that signature."""

import base64
import time
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from crypto.identity import Identity
from crypto.sealing import x25519_public_of
from federation.descriptor import issue_invite, sign_admission, sign_join, verify_admission, verify_descriptor
from node.fed import wire as fed_wire
from node.fed.join import JoinProtocol
from node.fed.membership import Membership
from node.fed.store import FederationStore
from tests.federation_support import make_descriptor


def x25519(identity: Identity) -> str:
    return base64.b64encode(x25519_public_of(identity)).decode()


@pytest.fixture
def creator_side(tmp_path: Path) -> tuple[JoinProtocol, Identity, Any, list[bytes]]:
    """A creator's join protocol over a real store holding an invite-only federation (and the creator as member)."""
    creator = Identity.generate()
    descriptor_bytes = make_descriptor(creator, admission="invite", created=int(time.time()))
    descriptor = verify_descriptor(descriptor_bytes)
    store = FederationStore(tmp_path / "state.db", tmp_path / "federations")
    fid = store.add_federation(descriptor_bytes, "creator").id
    own = sign_join(creator, fid, x25519(creator))
    admission = sign_admission(creator, descriptor, own)
    store.add_member(fid, verify_admission(descriptor, own, admission), own, admission)
    gossiped: list[bytes] = []
    joins = JoinProtocol(
        creator, cast(Any, None), store, Membership(store), lambda f, kind, data: gossiped.append(data), cast(Any, None)
    )
    return joins, creator, descriptor, gossiped


def admit(joins: JoinProtocol, requests: list[bytes]) -> list[fed_wire.Welcome | fed_wire.Refusal]:
    async def main() -> list[fed_wire.Welcome | fed_wire.Refusal]:
        return [await trio.to_thread.run_sync(joins.admit, r) for r in requests]

    return trio.run(main)


def test_a_bearer_invite_admits_one_node_once(creator_side: tuple[JoinProtocol, Identity, Any, list[bytes]]) -> None:
    # Arrange: one `*` invite shared by five nodes
    joins, creator, descriptor, gossiped = creator_side
    fid = descriptor.federation_id
    invite = issue_invite(creator, fid, "*", ttl_s=600)
    nodes = [Identity.generate() for _ in range(5)]
    requests = [sign_join(n, fid, x25519(n), invite=invite) for n in nodes]

    # Act: the first joins, the four others try the same invite; the first asks again
    answers = admit(joins, [*requests, requests[0]])

    # Assert
    kinds = [a.reason if isinstance(a, fed_wire.Refusal) else "welcome" for a in answers]
    assert kinds == ["welcome", "invite_used", "invite_used", "invite_used", "invite_used", "welcome"]
    assert len(gossiped) == 2  # the same member again is gossiped with the same admission
    request, admission = fed_wire.decode_admitted(gossiped[0])
    assert (
        request == requests[0] and verify_admission(descriptor, request, admission).fingerprint == nodes[0].fingerprint
    )
    assert gossiped[0] == gossiped[1]


def test_a_welcome_lists_members_with_the_creators_admissions(
    creator_side: tuple[JoinProtocol, Identity, Any, list[bytes]],
) -> None:
    # Arrange
    joins, creator, descriptor, _ = creator_side
    fid = descriptor.federation_id
    joiner = Identity.generate()
    request = sign_join(joiner, fid, x25519(joiner), invite=issue_invite(creator, fid, joiner.fingerprint, ttl_s=60))

    # Act
    (welcome,) = admit(joins, [request])

    # Assert: every listed member verifies against the descriptor with its admission, none without one
    assert isinstance(welcome, fed_wire.Welcome)
    members = [fed_wire.decode_admitted(base64.b64decode(m)) for m in welcome.members]
    fingerprints = {verify_admission(descriptor, r, a).fingerprint for r, a in members}
    assert fingerprints == {creator.fingerprint, joiner.fingerprint}
