"""The marketplace registry over the Kademlia DHT: signed records, one per name and publisher, under /mirador/….

A publisher puts its signed record (marketplace.registry_record) into the DHT and announces itself as a provider of
the name's key, so that any node can find every publisher of a name: the providers' PeerIDs embed their Ed25519 keys,
which give their fingerprints, which give the record keys. A content holder announces itself as a provider of each
envelope CID it can serve.

Every DHT node validates records before storing them (`RecordValidator`, registered for the `mirador` namespace in a
strict NamespacedValidator): unsigned, forged, expired, replayed and rolled-back records are refused.

py-libp2p 0.8.1 answers `get_value` and `find_providers` from the local store alone when it holds anything, so a node
would never see a newer record once it cached one; lookups here always ask the network as well. `lookup` and
`providers` are walks (node.p2p.dht_walk: one session per lookup, streams reused per peer, a record walk ending
after ENOUGH_ANSWERS valid answers, every publisher's walk started as soon as it is found); `values` (federation
descriptors, every distinct valid value) are walks too. A lookup's verified records are kept for RECENT_S, for
pulls that follow a search (`recent`).
"""

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

import trio
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import Validator
from multiaddr import Multiaddr

from crypto.identity import Identity, fingerprint_of
from marketplace.cid import Cid
from marketplace.registry_record import (
    ValidRecord,
    parse_record,
    record_key,
    select_record,
    sign_record,
    validate_record,
)
from node.p2p.dht_walk import DhtSession, walk
from node.p2p.host import P2PConfig, P2PError, P2PNode
from node.p2p.peerstore_guard import MAX_ADDR_BYTES, MAX_ADDRS

NAMESPACE = "mirador"
MAX_PROVIDERS = 32  # content providers of a key taken by a walk
MAX_PUBLISHERS = 64  # publishers of a name resolved by a lookup
# New providers or publishers taken from one answer: a hostile peer can list made-up ones (any Ed25519 key is a
# PeerID), but only this many; the next answers, from other peers, bring the real ones.
MAX_NEW_PER_ANSWER = 8
# Peers asked at once: py-libp2p serves 12 inbound DHT streams per node and resets the rest, and a reset makes the
# asking node drop that peer from its routing table (measured: tables fell from 31 to 17 of 31 under 32-wide asks).
ALPHA = 3
# A record walk ends once this many peers have answered with a valid record (puts go to the k = 20 closest).
ENOUGH_ANSWERS = 3
# A pull within this long of a lookup of its name (a search, typically) resolves the records that lookup found.
RECENT_S = 30.0
MAX_RECENT_NAMES = 256
log = logging.getLogger(__name__)


class StoredValueValidator(Validator):
    """A validator that can compare a new value with the one its DHT already stores under the same key."""

    def __init__(self) -> None:
        self._stored: Callable[[str], bytes | None] = lambda key: None

    def bind(self, dht: KadDHT) -> None:
        """Read stored values from `dht`'s value store."""

        def stored(key: str) -> bytes | None:
            record = dht.value_store.get(key.encode())
            return record.value if record is not None else None

        self._stored = stored


class RecordValidator(StoredValueValidator):
    """The DHT's check of /mirador/ records: `validate_record` against the record this node already stores."""

    def validate(self, key: str, value: bytes) -> None:
        """Raise RecordRejected unless `value` is a valid record for `key` that may replace the stored one."""
        old = self._stored(key)
        validate_record(key, value, None if old == value else old)

    def select(self, key: str, values: list[bytes]) -> int:
        """The newest valid record (highest sequence); 0 if none is valid, which keeps the stored one."""
        return max(select_record(key, values), 0)


def name_key(name: str) -> bytes:
    """The provider key of a name: a sha2-256 multihash of '/mirador/name/<name>'."""
    return bytes([0x12, 0x20]) + hashlib.sha256(f"/mirador/name/{name}".encode()).digest()


def fingerprint_of_peer(peer: ID) -> str | None:
    """The node fingerprint behind a PeerID (Ed25519 keys are embedded in the ID); None for other keys."""
    try:
        key = peer.extract_public_key()
    except Exception:
        return None
    raw = key.to_bytes() if key is not None else b""
    return fingerprint_of(raw) if len(raw) == 32 else None


class DhtRegistry:
    """Announce and look up registry records and content providers through a running node's DHT.

    Lookups keep their verified records for a short while (`recent`): a pull right after a search resolves the very
    records the user was shown without walking again. Every lookup itself walks; only callers that ask for
    `recent` records get them, expired records are dropped on the way out, and our own announce forgets the name."""

    def __init__(self, dht: KadDHT, identity: Identity, clock: Callable[[], float] = time.monotonic) -> None:
        self.dht, self.identity, self.clock = dht, identity, clock
        self._recent: OrderedDict[str, tuple[float, list[ValidRecord]]] = OrderedDict()
        self._announced: dict[str, float] = {}  # our names, when we last announced them

    async def announce(self, name: str, versions: dict[str, str]) -> bytes:
        """Sign and store the record of our `versions` (version -> envelope CID) of `name`; provide the name key."""
        key = record_key(name, self.identity.fingerprint)
        stored = self.dht.value_store.get(key.encode())
        last_seq = parse_record(stored.value).seq if stored is not None else -1
        value = sign_record(self.identity, name, versions, seq=max(time.time_ns() // 1000, last_seq + 1))
        self._recent.pop(name, None)
        self._announced[name] = self.clock()
        await self.dht.put_value(key, value)
        await self.dht.provider_store.provide(name_key(name))
        return value

    async def provide(self, cid: str) -> None:
        """Announce that this node serves the content `cid` (its multihash is the provider key)."""
        await self.dht.provider_store.provide(Cid.parse(cid).multihash)

    async def providers(self, key: bytes) -> list[PeerInfo]:
        """Providers of `key`: the local provider store, then one walk toward the key (at most MAX_PROVIDERS)."""
        found: dict[ID, PeerInfo] = {p.peer_id: p for p in self.dht.provider_store.get_providers(key)}

        def keep(peer: ID, answer: Message) -> bool:
            new = [info for info in provider_infos(answer) if info.peer_id not in found]
            for info in new[:MAX_NEW_PER_ANSWER]:
                found[info.peer_id] = info
            return len(found) >= MAX_PROVIDERS

        async with DhtSession(self.dht) as session:
            await walk(session, key, Message.MessageType.GET_PROVIDERS, keep)
        return list(found.values())[:MAX_PROVIDERS]

    async def values(self, key: str) -> list[bytes]:
        """Every valid value for `key` held locally or by the closest peers (each one validated here)."""
        return await dht_values(self.dht, key, lambda value: validate_record(key, value))

    def recent(self, name: str, max_age_s: float = RECENT_S) -> list[ValidRecord] | None:
        """The records a lookup of `name` found less than `max_age_s` ago (None if none did), those not expired."""
        entry = self._recent.get(name)
        if entry is None or self.clock() - entry[0] > max_age_s:
            return None
        now = time.time()
        return [r for r in entry[1] if r.record.expires >= now]

    async def lookup(self, name: str) -> list[ValidRecord]:
        """The newest valid record of every publisher of `name` that the network knows (ours included).

        One session: a walk for the name's providers, and as each publisher appears, a walk for its record (they
        run side by side), each ending once ENOUGH_ANSWERS peers have answered with a valid record. Our own record
        comes from our store when it is there (we signed the newest one). The result is kept for `recent`."""
        started = self.clock()
        found = await self._lookup(name)
        if self._announced.get(name, -math.inf) >= started:  # we announced while it walked: it may hold our old one
            return found
        self._recent[name] = (started, found)
        self._recent.move_to_end(name)
        while len(self._recent) > MAX_RECENT_NAMES:
            self._recent.popitem(last=False)
        return found

    async def _lookup(self, name: str) -> list[ValidRecord]:
        """`lookup` without keeping the result."""
        own = self.identity.fingerprint
        records: dict[str, ValidRecord] = {}
        mine = self.dht.value_store.get(record_key(name, own).encode())
        if mine is not None:
            try:
                records[own] = validate_record(record_key(name, own), mine.value)
            except ValueError as stale:  # expired: looked up like anyone's below
                log.info("our own record of %s is not valid any more: %s", name, stale)
        async with DhtSession(self.dht) as session, trio.open_nursery() as nursery:
            resolving: set[str] = set(records)

            async def resolve(publisher: str) -> None:
                record = await newest_record(session, record_key(name, publisher))
                if record is not None:
                    records[publisher] = record

            def publishers_of(peers: list[ID]) -> None:
                """Resolve the publishers among `peers` not being resolved yet (at most MAX_NEW_PER_ANSWER)."""
                fingerprints = dict.fromkeys(f for f in map(fingerprint_of_peer, peers) if f is not None)
                new = [f for f in fingerprints if f not in resolving][:MAX_NEW_PER_ANSWER]
                for fingerprint in new[: max(0, MAX_PUBLISHERS - len(resolving))]:
                    resolving.add(fingerprint)
                    nursery.start_soon(resolve, fingerprint)

            def providers(peer: ID, answer: Message) -> bool:
                publishers_of([info.peer_id for info in provider_infos(answer)])
                return False  # every publisher is wanted: the walk goes on to the closest peers

            local = [info.peer_id for info in self.dht.provider_store.get_providers(name_key(name))]
            for start in range(0, len(local), MAX_NEW_PER_ANSWER):  # our own store is not capped per answer
                publishers_of(local[start : start + MAX_NEW_PER_ANSWER])
            await walk(session, name_key(name), Message.MessageType.GET_PROVIDERS, providers)
        return [records[publisher] for publisher in sorted(records)]


def registry_node(
    identity: Identity, config: P2PConfig | None = None, extra: Mapping[str, Validator] | None = None
) -> tuple[P2PNode, DhtRegistry]:
    """A P2PNode whose DHT stores /mirador/ records only after `RecordValidator` accepts them (and the `extra`
    namespaces only after their validators do), and its registry."""
    validator = RecordValidator()
    validators: dict[str, Validator] = {**(extra or {}), NAMESPACE: validator}
    node = P2PNode(identity, config, validators)
    if node.dht is None:
        raise P2PError("the registry needs the DHT (P2PConfig.dht)")
    for each in validators.values():
        bind = getattr(each, "bind", None)
        if callable(bind):
            bind(node.dht)
    return node, DhtRegistry(node.dht, identity)


async def dht_values(dht: KadDHT, key: str, check: Callable[[bytes], object]) -> list[bytes]:
    """The value held locally for `key`, then the distinct ones that `check` accepts from a walk toward the key.

    `check` refuses a value by raising ValueError (logged); the local value is not checked again (the DHT's
    validator accepted it).
    """
    local = dht.value_store.get(key.encode())
    found = [local.value] if local is not None else []

    def keep(peer: ID, answer: Message) -> bool:
        value = answer.record.value if answer.HasField("record") else b""
        if value and value not in found and _accepted(key, peer, value, check):
            found.append(value)
        return False  # every distinct value is wanted

    async with DhtSession(dht) as session:
        await walk(session, key.encode(), Message.MessageType.GET_VALUE, keep)
    return found


def _accepted(key: str, peer: ID, value: bytes, check: Callable[[bytes], object]) -> bool:
    """Whether `check` accepts a value `peer` answered for `key` (a refusal is logged)."""
    try:
        check(value)
    except ValueError as refused:
        log.info("refused a value for %s from %s: %s", key, peer, refused)
        return False
    return True


async def newest_record(session: DhtSession, key: str) -> ValidRecord | None:
    """The newest valid record under `key` among the local one and those of the first ENOUGH_ANSWERS peers of a
    walk that answer with a valid record (None when nobody holds one)."""
    values: list[bytes] = []
    local = session.dht.value_store.get(key.encode())
    if local is not None:
        values.append(local.value)
    valid_answers = 0

    def keep(peer: ID, answer: Message) -> bool:
        nonlocal valid_answers
        value = answer.record.value if answer.HasField("record") else b""
        if not value:
            return False
        if value not in values:
            if not _accepted(key, peer, value, lambda v: validate_record(key, v)):
                return False
            values.append(value)
        valid_answers += 1
        return valid_answers >= ENOUGH_ANSWERS

    await walk(session, key.encode(), Message.MessageType.GET_VALUE, keep)
    best = select_record(key, values)
    if best < 0:
        return None
    found = validate_record(key, values[best])
    if local is None or values[best] != local.value:
        # kept as this node's floor: a later walk that meets only older (still valid) copies cannot roll it back
        session.dht.value_store.put_record(key.encode(), Record(key=key.encode(), value=values[best]))
    return found


def provider_infos(answer: Message) -> list[PeerInfo]:
    """The providers a GET_PROVIDERS answer lists (at most MAX_PROVIDERS with at most MAX_ADDRS short addresses
    each, malformed entries skipped)."""
    infos = []
    for entry in answer.providerPeers[:MAX_PROVIDERS]:
        try:
            addrs = [Multiaddr(a) for a in entry.addrs[:MAX_ADDRS] if len(a) <= MAX_ADDR_BYTES]
            infos.append(PeerInfo(ID(entry.id), addrs))
        except Exception:
            continue
    return infos
