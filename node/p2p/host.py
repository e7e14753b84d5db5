"""The node's libp2p host: the node's Ed25519 key as identity, TCP, Noise only, Yamux, Kademlia DHT, gossipsub.

py-libp2p 0.8.1 is trio-only and its `new_host()` also offers plaintext, secio and TLS unless `sec_opt` is given, so
the host is always built with Noise alone. The DHT and pubsub are created and started before any dial (pubsub ignores
connections made before it ran; a late DHT keeps an empty routing table).
"""

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import multiaddr
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair as ed25519_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamError, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStore
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.records.pubkey import PublicKeyValidator
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from crypto.identity import Identity
from crypto.refusal import Refused
from node.core.fsutil import atomic_write_bytes
from node.p2p.dht_guard import DhtGuard
from node.p2p.inbound import hold_slots_per_connection
from node.p2p.peerstore_guard import addrs_of, guard_peerstore

_CLOSE_TIMEOUT = 5.0
PEERSTORE_CLEANUP_S = 300
log = logging.getLogger(__name__)


class P2PError(Exception):
    """The P2P host could not start or could not reach a peer."""


@dataclass(frozen=True)
class P2PConfig:
    """How the host listens and how long it waits; port 0 picks any free port."""

    listen_host: str = "127.0.0.1"
    port: int = 0
    dial_timeout: float = 10.0
    negotiate_timeout: int = 10
    max_connections: int = 64
    max_connections_per_peer: int = 1
    dht: bool = True
    pubsub: bool = True
    refresh_max_interval_s: float = 60.0  # DHT refresh: 1, 2, 4 ... s after start and after each connect, capped
    peers_file: Path | None = None  # the routing table, saved after each refresh and redialled at start
    max_saved_peers: int = 64


def libp2p_key_pair(identity: Identity) -> KeyPair:
    """The libp2p Ed25519 key pair of the node's identity (same key, so the PeerID is stable across restarts)."""
    key = serialization.load_pem_private_key(identity.to_pem(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise P2PError(f"the node identity is not an Ed25519 key ({type(key).__name__})")
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pair = ed25519_key_pair(seed)
    if pair.public_key.to_bytes() != identity.public_key_bytes:
        raise P2PError("the libp2p key derived from the node identity has a different public key")
    return pair


def peer_id_of(identity: Identity) -> ID:
    """The PeerID other nodes see for this identity (identity multihash of the protobuf Ed25519 public key)."""
    return ID.from_pubkey(libp2p_key_pair(identity).public_key)


def build_host(key_pair: KeyPair, config: P2PConfig) -> IHost:
    """A libp2p host that speaks Noise only (no plaintext, secio or TLS) and Yamux only, over TCP only."""
    noise = NoiseTransport(key_pair, noise_privkey=x25519_key_pair().private_key)
    # py-libp2p's auto-connector dials peers from the peerstore until (low + high) / 2 connections: keep that modest
    # for a personal node (64 max -> it aims at 32) rather than the library's hundreds.
    high = max(1, config.max_connections * 3 // 4)
    connection_config = ConnectionConfig(
        max_connections=config.max_connections,
        high_watermark=high,
        low_watermark=high // 3,
        min_connections=high // 12,
        max_connections_per_peer=config.max_connections_per_peer,
        dial_timeout=config.dial_timeout,
        inbound_upgrade_timeout=config.negotiate_timeout,
        outbound_upgrade_timeout=config.negotiate_timeout,
        inbound_stream_protocol_negotiation_timeout=config.negotiate_timeout,
        outbound_stream_protocol_negotiation_timeout=config.negotiate_timeout,
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=[tcp_multiaddr(config.listen_host, config.port)],
        enable_tcp=True,
        negotiate_timeout=config.negotiate_timeout,
        connection_config=connection_config,
    )
    hold_slots_per_connection(host.get_network())
    guard_peerstore(host.get_peerstore(), host.get_id())  # type: ignore[arg-type]  # new_host's is a PeerStore
    return host


def tcp_multiaddr(host: str, port: int) -> multiaddr.Multiaddr:
    """/ip4/HOST/tcp/PORT."""
    return multiaddr.Multiaddr(f"/ip4/{host}/tcp/{port}")


class Libp2pStream:
    """A libp2p stream as framing's ByteStream: end of stream (StreamEOF, or a reset) reads as b""."""

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream

    @property
    def remote_peer(self) -> ID:
        """The PeerID at the other end, authenticated by the Noise handshake."""
        return self.stream.muxed_conn.peer_id

    @property
    def remote_address(self) -> tuple[str, int] | None:
        """(IP, port) of the connection this stream runs on, as the socket sees it (None if unknown)."""
        try:
            return self.stream.get_remote_address()
        except Exception:  # a transport that cannot tell
            return None

    async def read(self, n: int) -> bytes:
        """Read up to `n` bytes; b"" once the peer's side is finished or gone."""
        try:
            return await self.stream.read(n)
        except (StreamEOF, StreamReset):
            return b""

    async def write(self, data: bytes) -> None:
        """Write all of `data`; ConnectionResetError if the stream is closed or reset."""
        try:
            await self.stream.write(data)
        except StreamError as exc:
            raise ConnectionResetError(f"libp2p stream: {exc or type(exc).__name__}") from exc

    async def close(self) -> None:
        """Close the stream."""
        await self.stream.close()

    async def reset(self) -> None:
        """Abort the stream in both directions."""
        await self.stream.reset()


class P2PNode:
    """The running libp2p side of a node: host, DHT (server mode) and gossipsub in the caller's trio loop.

    Use `async with P2PNode(identity) as node:` or `await nursery.start(node.run)` (then `node.stop()`).
    """

    def __init__(
        self, identity: Identity, config: P2PConfig | None = None, validators: Mapping[str, Validator] | None = None
    ) -> None:
        self.config = config or P2PConfig()
        self.key_pair = libp2p_key_pair(identity)
        self.host: IHost = build_host(self.key_pair, self.config)
        # Created before the host listens, so that no connection is made before they see it.
        self.dht = _dht(self.host, validators or {}) if self.config.dht else None
        if self.dht is not None:
            DhtGuard(self.dht, self.refused).install(self.host)
        self.gossipsub = _gossipsub() if self.config.pubsub else None
        self.pubsub = Pubsub(self.host, self.gossipsub) if self.gossipsub is not None else None
        self._stack: AsyncExitStack | None = None
        self.stream_refusals: dict[str, int] = {}  # "protocol reason" -> inbound streams that ended in an exception
        self._refusal_hooks: list[Callable[[ID, str, str], None]] = []
        self._stop = trio.Event()
        self._refresh_now = trio.Event()
        self._used = False

    @property
    def peer_id(self) -> ID:
        """This node's PeerID."""
        return self.host.get_id()

    @property
    def listen_addrs(self) -> list[multiaddr.Multiaddr]:
        """Full listen multiaddrs (/ip4/…/tcp/…/p2p/ID), once running."""
        suffix = multiaddr.Multiaddr(f"/p2p/{self.peer_id}")
        return [addr.encapsulate(suffix) for addr in self.host.get_transport_addrs()]

    async def __aenter__(self) -> "P2PNode":
        """Listen, then start the DHT and pubsub; ready to dial when this returns."""
        if self._stack is not None or self._used:
            raise P2PError("a P2PNode runs once; make a new one to restart")
        self._used = True
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.host.run(listen_addrs=[self._listen_addr()]))
            if self.dht is not None:
                await stack.enter_async_context(background_trio_service(self.dht))
            if self.pubsub is not None and self.gossipsub is not None:
                await stack.enter_async_context(background_trio_service(self.pubsub))
                await stack.enter_async_context(background_trio_service(self.gossipsub))
                with trio.fail_after(self.config.negotiate_timeout):
                    await self.pubsub.wait_until_ready()
            if not self.host.get_transport_addrs():
                raise P2PError(f"the host is not listening on {self._listen_addr()}")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop pubsub, the DHT and the host (closing every connection and listener)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await self.host.close()
            await stack.aclose()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run inside a nursery (`await nursery.start(node.run)`): started once ready to dial, until `stop()`.

        While running, the DHT routing table is refreshed (a lookup walk through the peers known so far) on a
        backoff schedule that restarts after every `connect()`: that is how nodes that know one bootstrap peer
        discover the rest of the network.
        """
        async with self, trio.open_nursery() as nursery:
            nursery.start_soon(self._clean_peerstore)
            if self.dht is not None:
                nursery.start_soon(self._refresh_loop)
                nursery.start_soon(self._redial_saved_peers)
            task_status.started(self)
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        self._save_peers()

    async def _clean_peerstore(self) -> None:
        """Drop expired peerstore entries every 5 minutes (py-libp2p has the task but does not start it)."""
        peerstore = self.host.get_peerstore()
        if isinstance(peerstore, PeerStore):
            await peerstore.start_cleanup_task(PEERSTORE_CLEANUP_S)

    async def _refresh_loop(self) -> None:
        interval = 1.0
        while True:
            with trio.move_on_after(interval):
                await self._refresh_now.wait()
                interval = 1.0
            self._refresh_now = trio.Event()
            await self.discover()
            self._save_peers()
            interval = min(interval * 2, self.config.refresh_max_interval_s)

    def _save_peers(self) -> None:
        """Write the routing table's peers with their addresses (the persisted routing table)."""
        if self.config.peers_file is None or self.dht is None:
            return
        saved = []
        for peer in self.known_peers()[: self.config.max_saved_peers]:
            addrs = [str(a) for a in addrs_of(self.host.get_peerstore(), peer) if str(a).startswith("/ip4/")]
            if addrs:
                saved.append({"peer_id": str(peer), "addrs": addrs})
        try:
            atomic_write_bytes(self.config.peers_file, json.dumps({"peers": saved}, indent=1).encode())
        except OSError as exc:
            log.warning("could not save the routing table to %s: %s", self.config.peers_file, exc)

    def saved_peers(self) -> list[str]:
        """Full multiaddrs of the peers saved by the last run (unreadable or malformed entries are skipped)."""
        path = self.config.peers_file
        if path is None or not path.is_file():
            return []
        try:
            doc = json.loads(path.read_bytes()[: 1 << 20])
            entries = doc["peers"][: self.config.max_saved_peers]
            addrs = [f"{a}/p2p/{ID.from_base58(e['peer_id'])}" for e in entries for a in e["addrs"][:4]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the saved routing table %s: %s", path, exc)
            return []
        return [a for a in addrs if a.startswith("/ip4/")]

    async def _redial_saved_peers(self) -> None:
        """Dial the peers of the last run (quietly: many may be gone)."""
        for addr in self.saved_peers():
            with trio.move_on_after(self.config.dial_timeout):
                try:
                    await self.connect(addr)
                except (P2PError, ValueError) as exc:
                    log.debug("saved peer %s: %s", addr, exc)

    async def discover(self) -> int:
        """Refresh the DHT routing table now (bounded in time); returns how many peers it holds."""
        if self.dht is None:
            return 0
        with trio.move_on_after(self.config.dial_timeout):
            try:
                await self.dht.refresh_routing_table()
            except Exception as exc:  # a peer that vanished mid-walk; the next refresh tries again
                log.debug("DHT refresh failed: %s", exc)
        return int(self.dht.get_routing_table_size())

    def known_peers(self) -> list[ID]:
        """Peers in the DHT routing table (known, not necessarily connected)."""
        return list(self.dht.routing_table.get_peer_ids()) if self.dht is not None else []

    def dht_stats(self) -> dict[str, int]:
        """Sizes of the DHT's routing table, value store and provider store."""
        if self.dht is None:
            return {}
        return {
            "routing_table": int(self.dht.get_routing_table_size()),
            "records": int(self.dht.get_value_store_size()),
            "provider_keys": int(self.dht.provider_store.size()),
        }

    def stop(self) -> None:
        """Ask `run()` to return."""
        self._stop.set()

    async def connect(self, addr: multiaddr.Multiaddr | str) -> ID:
        """Dial a full multiaddr (…/p2p/ID) within the dial timeout; return the peer's ID."""
        return await self.connect_peer(info_from_p2p_addr(multiaddr.Multiaddr(str(addr))))

    async def connect_peer(self, info: PeerInfo) -> ID:
        """Dial a peer by its ID and addresses within the dial timeout (at once if already connected)."""
        if info.peer_id in self.host.get_connected_peers():
            return info.peer_id
        try:
            with trio.fail_after(self.config.dial_timeout):
                await self.host.connect(info)
        except trio.TooSlowError:
            raise P2PError(f"could not connect to {info.peer_id} within {self.config.dial_timeout:g} s") from None
        except Exception as exc:
            raise P2PError(f"could not connect to {info.peer_id}: {exc}") from exc
        if self.dht is not None:
            await self.dht.add_peer(info.peer_id)
            self._refresh_now.set()
        return info.peer_id

    def peers(self) -> list[ID]:
        """The peers this node is connected to now."""
        return list(self.host.get_connected_peers())

    async def disconnect(self, peer_id: ID) -> int:
        """Close every connection to `peer_id`, also those that arrive while closing; return how many were closed.

        py-libp2p's `Swarm.close_peer` closes the connections it saw, then forgets the peer's whole entry: a
        connection registered during those closes (a quick redial) is dropped from the table while staying open.
        """
        network, closed = self.host.get_network(), set[int]()
        while connections := [c for c in network.get_connections(peer_id) if id(c) not in closed]:
            for connection in connections:
                closed.add(id(connection))
                await connection.close()
        return len(closed)

    async def open_stream(self, peer_id: ID, protocol: str) -> Libp2pStream:
        """Open a stream to a connected peer for `protocol`, negotiated within the negotiation timeout."""
        try:
            with trio.fail_after(self.config.negotiate_timeout):
                stream = await self.host.new_stream(peer_id, [TProtocol(protocol)])
        except trio.TooSlowError:
            raise P2PError(f"{protocol}: no stream to {peer_id} within {self.config.negotiate_timeout} s") from None
        return Libp2pStream(stream)

    def set_stream_handler(self, protocol: str, handler: Callable[[Libp2pStream], Awaitable[None]]) -> None:
        """Serve `protocol`: `handler(Libp2pStream)` runs for each inbound stream (the stream is closed after).

        Whatever the handler raises ends that stream alone: a `Refused` (the peer's bytes were refused, or the
        stream broke) is logged at INFO, anything else (a bug, or a library error) with its traceback; both are
        counted by protocol and reason and reported to the `on_refusal` hooks (the notice board scores the peer).
        An exception must never reach py-libp2p's handler task: it would end the swarm and the daemon with it.
        """

        async def wrapped(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
            try:
                await handler(Libp2pStream(stream))
            except Exception as exc:
                self._refused(protocol, peer, exc)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await stream.close()

        self.host.set_stream_handler(TProtocol(protocol), wrapped)

    def on_refusal(self, hook: Callable[[ID, str, str], None]) -> None:
        """Call `hook(peer, protocol, reason)` for every inbound stream that ended in an exception."""
        self._refusal_hooks.append(hook)

    def _refused(self, protocol: str, peer: ID, exc: Exception) -> None:
        reason = str(exc.reason) if isinstance(exc, Refused) else "handler_error"
        if isinstance(exc, Refused):
            log.info("%s: stream from %s refused: %s", protocol, peer, exc)
        else:
            log.warning("%s: stream from %s failed; it alone was dropped", protocol, peer, exc_info=exc)
        self.refused(protocol, peer, reason)

    def refused(self, protocol: str, peer: ID, reason: str) -> None:
        """Count a refusal of `peer`'s inbound stream on `protocol` (raised, or answered by the handler) and report it
        to the `on_refusal` hooks."""
        key = f"{protocol} {reason}"
        self.stream_refusals[key] = self.stream_refusals.get(key, 0) + 1
        for hook in self._refusal_hooks:
            try:
                hook(peer, protocol, reason)
            except Exception:
                log.exception("a stream refusal hook failed")

    def _listen_addr(self) -> multiaddr.Multiaddr:
        """The TCP address to listen on."""
        return tcp_multiaddr(self.config.listen_host, self.config.port)


def _dht(host: IHost, validators: Mapping[str, Validator]) -> KadDHT:
    """A DHT server that stores only records of the namespaces given (plus libp2p's public keys): strict mode."""
    namespaced = NamespacedValidator({"pk": PublicKeyValidator(), **validators}, strict_validation=True)
    return KadDHT(host, DHTMode.SERVER, validator=namespaced, validator_changed=True, strict_validation=True)


def _gossipsub() -> GossipSub:
    """A gossipsub router with the library's usual mesh degrees."""
    return GossipSub(protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12)
