"""Both sides of the join protocol (/mirador/fed/join/1.0.0): the creator admits a signed join request and answers
with a welcome (members, HE public context and, for members only, the HE secret sealed to the joiner's X25519 key);
the joiner checks the welcome and stores what it was given."""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from crypto.he import PublicContext, SecretContext
from crypto.identity import Identity
from crypto.refusal import Refused
from crypto.sealing import SealError, seal, unseal, x25519_public_of
from crypto.signed import decode_strict
from federation.descriptor import (
    JOIN_SCHEMA,
    MAX_JOIN_BYTES,
    FederationDescriptor,
    JoinError,
    JoinRequest,
    sign_admission,
    sign_join,
    verify_admission,
    verify_descriptor,
    verify_join,
)
from node.fed import wire as fed_wire
from node.fed.errors import FederationError
from node.fed.membership import Membership, peer_of
from node.p2p.host import Libp2pStream, P2PNode

log = logging.getLogger(__name__)


class JoinProtocol:
    """The join protocol of one node: `serve` answers joiners (as the creator), `join` asks a creator."""

    def __init__(
        self,
        identity: Identity,
        p2p: P2PNode,
        state: Any,  # node.fed.store.FederationStore
        membership: Membership,
        gossip: Callable[[str, str, bytes], None],
        dial: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.identity, self.p2p, self.state, self.gossip, self.dial = identity, p2p, state, gossip, dial
        self.membership = membership

    async def serve(self, stream: Libp2pStream) -> None:
        """Admit a joiner: verify its request, record it, gossip it, and welcome it (with the HE secret if it may).
        A broken stream raises (P2PNode's handler guard logs it and scores the peer)."""
        request = await fed_wire.read_join(stream)
        answer = await trio.to_thread.run_sync(self.admit, request)
        await fed_wire.answer_join(stream, answer)
        if isinstance(answer, fed_wire.Refusal):
            log.info("join from %s refused: %s: %s", stream.remote_peer, answer.reason, answer.detail)
            self.p2p.refused(fed_wire.JOIN_PROTOCOL, stream.remote_peer, answer.reason)

    def admit(self, request: bytes) -> fed_wire.Welcome | fed_wire.Refusal:
        """The creator's answer to a join request (in a worker thread): a welcome, or a refusal with its reason.
        Every refusal (a bad request, a conflicting member, a key that cannot be sealed to) is an answer."""
        try:
            return self._admit(request)
        except Refused as exc:
            return fed_wire.Refusal(reason=str(exc.reason)[:64], detail=exc.detail[:1024])

    def _admit(self, request: bytes) -> fed_wire.Welcome | fed_wire.Refusal:
        fid = decode_strict(request, JoinRequest, MAX_JOIN_BYTES, JOIN_SCHEMA, JoinError).federation_id
        row = self.state.federation(fid)
        if row is None:
            return fed_wire.Refusal(reason="unknown_federation", detail="this node is not in that federation")
        descriptor = row.descriptor
        if descriptor.creator != self.identity.fingerprint:
            return fed_wire.Refusal(reason="not_creator", detail="only the federation's creator admits members")
        member = verify_join(descriptor, request)  # invites judged by this node's clock, not the request's
        members = self.membership.members(fid)
        admitted = members.get(member.fingerprint)
        if member.invite_nonce and any(
            m.invite_nonce == member.invite_nonce for fp, m in members.items() if fp != member.fingerprint
        ):
            detail = "this invite was already used by another node (an invite admits one node, once)"
            return fed_wire.Refusal(reason="invite_used", detail=detail)
        if admitted is not None and admitted.role != member.role:
            # A role never changes: an aggregator-only node asking again as a member would get the HE secret while
            # it stays an aggregator candidate, and could decrypt every member's update.
            detail = f"{member.fingerprint} was admitted as {admitted.role}; a new role needs a new identity"
            return fed_wire.Refusal(reason="role_change", detail=detail)
        he_public, sealed = "", ""
        if descriptor.uses_he:  # sealed before anything is stored: a key that cannot be sealed to is refused
            public = self.state.he_public(fid)
            he_public = fed_wire.b64(public) if public else ""
            secret = self.state.he_secret(fid)
            if member.role == "member" and secret is not None:
                sealed = fed_wire.b64(seal(fed_wire.unb64(member.x25519, "x25519"), secret, seal_context(fid, member)))
        admission = sign_admission(self.identity, descriptor, request) if admitted is None else b""
        self.state.add_member(fid, member, request, admission)  # the same node with other keys: MemberConflictError
        rows = self.state.member_rows(fid)  # an admitted node asking again gets its stored request and admission
        entries = {r.fingerprint: self._admitted_entry(descriptor, r) for r in rows}
        trio.from_thread.run_sync(self.gossip, fid, "member", entries[member.fingerprint])
        return fed_wire.Welcome(
            descriptor=fed_wire.b64(row.descriptor_bytes),
            members=[fed_wire.b64(entries[r.fingerprint]) for r in rows],
            he_public=he_public,
            he_secret_sealed=sealed,
            global_round=row.global_round,
            global_cid=row.global_cid,
        )

    def _admitted_entry(self, descriptor: FederationDescriptor, row: Any) -> bytes:
        """A stored member as the federation passes it on: its request and admission (a member stored before
        admissions were signed gets one now, dated when it was stored)."""
        admission = row.admission or sign_admission(self.identity, descriptor, row.join_request, now=row.joined_at)
        return fed_wire.encode_admitted(row.join_request, admission)

    async def join(self, descriptor_bytes: bytes, via: str, role: str, invite: bytes | None) -> FederationDescriptor:
        """Join the federation of `descriptor_bytes` through the admitted member with key `via` (base64)."""
        descriptor = verify_descriptor(descriptor_bytes)
        fid = descriptor.federation_id
        request = sign_join(self.identity, fid, fed_wire.b64(x25519_public_of(self.identity)), invite=invite, role=role)
        peer = peer_of(via)
        await self.dial(peer)
        stream = await self.p2p.open_stream(peer, fed_wire.JOIN_PROTOCOL)
        try:
            welcome = await fed_wire.request_join(stream, request)
        finally:
            await stream.close()
        await trio.to_thread.run_sync(self.accept_welcome, descriptor_bytes, descriptor, welcome, role)
        return descriptor

    def accept_welcome(
        self, descriptor_bytes: bytes, descriptor: FederationDescriptor, welcome: fed_wire.Welcome, role: str
    ) -> None:
        """Check the welcome (descriptor, our admission, HE contexts, the sealed secret) and store it all."""
        fid = descriptor.federation_id
        if verify_descriptor(fed_wire.unb64(welcome.descriptor, "descriptor")).federation_id != fid:
            raise FederationError("the member answered with another federation's descriptor")
        members = []
        for entry in welcome.members:
            request, admission = fed_wire.decode_admitted(fed_wire.unb64(entry, "member"))
            members.append((verify_admission(descriptor, request, admission), request, admission))
        if self.identity.fingerprint not in {m.fingerprint for m, _, _ in members}:
            raise FederationError("the welcome does not list us as a member")
        secret = b""
        if descriptor.uses_he:
            if not welcome.he_public:
                raise FederationError("an HE federation's welcome must carry the public context")
            PublicContext.from_bytes(fed_wire.unb64(welcome.he_public, "he_public"))
            if role == "member":
                try:
                    secret = unseal(
                        self.identity,
                        fed_wire.unb64(welcome.he_secret_sealed, "he_secret"),
                        seal_context(fid, self.identity),
                    )
                except SealError as exc:
                    raise FederationError(f"the HE secret context could not be unsealed: {exc}") from None
                SecretContext.from_bytes(secret)
        self.state.add_federation(descriptor_bytes, "aggregator" if role == "aggregator" else "member")
        for member, request, admission in members:
            self.state.add_member(fid, member, request, admission)
        if descriptor.uses_he:
            self.state.save_he_public(fid, fed_wire.unb64(welcome.he_public, "he_public"))
            if secret:
                self.state.save_he_secret(fid, secret)


def seal_context(fid: str, member: Any) -> bytes:
    """Associated data of a sealed HE secret: the federation and the recipient (no replay elsewhere)."""
    return f"mirador he secret v1 {fid} {member.fingerprint}".encode()
