"""Bounds on what peers' answers can put into py-libp2p's peerstore, on every path (ours and the library's).

py-libp2p 0.8.1 adds the addresses a DHT answer gives for its closer peers to the node's peerstore as they come
(its own FIND_NODE walks and `get_value` do, outside this project's walks): any number per peer, deduplicated by a
list scan (5,000 addresses for one peer take ~0.7 s of the event loop, a 4 MiB answer could block it for an hour),
each call setting the whole entry's TTL (a permanent entry becomes one that expires), and past 1,000 peers it evicts
entries without addresses first: the node's own entry (its key pair) is one, and identify and record signing then
fail. `guard_peerstore` wraps `add_addrs` on the node's peerstore instance:
- at most MAX_ADDRS addresses per peer, each at most MAX_ADDR_BYTES (the rest are dropped);
- an entry that exists is refreshed but its TTL never shortened (a permanent one stays permanent);
- no addresses for the node itself;
- no new peer once the store holds `max_peers - 1` entries (adding one would evict another; expired entries go
  with `start_cleanup_task`, which P2PNode runs), and the node's own entry is never evicted (other paths, such as
  signed peer records, still create entries).
"""

import logging
from collections.abc import Sequence

from libp2p.abc import IPeerStore
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore
from multiaddr import Multiaddr

log = logging.getLogger(__name__)

MAX_ADDRS = 8  # addresses kept per peer
MAX_ADDR_BYTES = 256


def guard_peerstore(peerstore: PeerStore, me: ID) -> None:
    """Bound `peerstore.add_addrs` (and `add_addr`, which calls it) as the module says."""
    add_addrs = peerstore.add_addrs

    def bounded(peer_id: ID, addrs: Sequence[Multiaddr], ttl: int = 0) -> None:
        if peer_id == me:
            return
        data = peerstore.peer_data_map.get(peer_id)
        if data is None and len(peerstore.peer_data_map) >= peerstore.max_peers - 1:
            log.debug("peerstore full: addresses of a new peer %s dropped", peer_id)
            return
        current = data.get_addrs() if data is not None else []
        room = MAX_ADDRS - len(current)
        fresh = [a for a in addrs if a not in current and len(a.to_bytes()) <= MAX_ADDR_BYTES][: max(room, 0)]
        if not fresh and data is None:
            return
        # an existing entry is still refreshed (its last-seen time: a peer seen again does not expire)
        old_ttl = data.get_ttl() if data is not None else None
        add_addrs(peer_id, fresh, 0 if old_ttl == 0 or ttl == 0 else max(ttl, old_ttl or 0))  # 0: permanent

    peerstore.add_addrs = bounded  # type: ignore[method-assign]
    enforce = peerstore._enforce_peer_limit  # py-libp2p 0.8.1's eviction (pinned): it would take our entry first

    def enforce_keeping_ours() -> None:
        ours = peerstore.peer_data_map.pop(me, None)
        try:
            enforce()
        finally:
            if ours is not None:
                peerstore.peer_data_map[me] = ours

    peerstore._enforce_peer_limit = enforce_keeping_ours  # type: ignore[method-assign]


def addrs_of(peerstore: IPeerStore, peer: ID) -> list[Multiaddr]:
    """The peer's current addresses ([] if unknown or expired: py-libp2p raises for both)."""
    try:
        return list(peerstore.addrs(peer))
    except Exception:
        return []
