"""Who is in each federation: admitted nodes by fingerprint (their stored join requests verified again on every
change), their keys, the round's aggregator candidates; and the mapping between member keys and libp2p peers."""

from typing import Any

from federation.descriptor import FederationDescriptor, Member, verify_admission, verify_admitted


class Membership:
    """The admitted members of every federation in the node's store, cached per member count."""

    def __init__(self, state: Any) -> None:  # state: node.fed.store.FederationStore
        self.state = state
        self._cache: dict[str, tuple[int, dict[str, Member]]] = {}

    def members(self, fid: str) -> dict[str, Member]:
        """Every admitted node (its stored join request verified again), by fingerprint."""
        row = self.state.federation(fid)
        if row is None:
            return {}
        rows = self.state.member_rows(fid)
        cached = self._cache.get(fid)
        if cached is not None and cached[0] == len(rows):
            return cached[1]
        members = {
            r.fingerprint: verify_admission(row.descriptor, r.join_request, r.admission)
            if r.admission
            else verify_admitted(row.descriptor, r.join_request)  # stored before admissions were signed
            for r in rows
        }
        self._cache[fid] = (len(rows), members)
        return members

    def keys(self, fid: str, role: str | None = None) -> dict[str, str]:
        """The members' Ed25519 keys (base64) by fingerprint, of one role or all."""
        return {fp: m.key for fp, m in self.members(fid).items() if role is None or m.role == role}

    def candidates(self, descriptor: FederationDescriptor) -> dict[str, str]:
        """Who may aggregate: every member under dp, the aggregator-only nodes under HE."""
        return self.keys(descriptor.federation_id, "aggregator" if descriptor.uses_he else None)


def peer_of(key_b64: str) -> Any:
    """The libp2p PeerID of a member's Ed25519 key (base64 raw)."""
    import base64

    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    return ID.from_pubkey(Ed25519PublicKey.from_bytes(base64.b64decode(key_b64)))


def key_of(peer: Any) -> str:
    """The base64 raw Ed25519 public key inlined in a libp2p PeerID ("" if it inlines none, e.g. an RSA peer)."""
    import base64

    try:
        key = peer.extract_public_key()
    except Exception:  # a PeerID that is not an identity multihash of a key
        return ""
    return base64.b64encode(key.to_bytes()).decode() if key is not None else ""
