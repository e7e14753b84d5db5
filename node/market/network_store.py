"""The marketplace's outside parts on the P2P network: a content store that fills itself from peers, a DHT resolver.

Both are called by `marketplace.artifacts.Marketplace`, which is synchronous: the daemon runs a pull in a worker
thread (`trio.to_thread.run_sync`) and these classes step back into the trio loop with `trio.from_thread.run` for
each network operation.
"""

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from marketplace.artifacts import NameResolver
from marketplace.cid import Cid
from marketplace.content_store import AddResult, ContentStoreError, EmbeddedStore, Progress
from marketplace.semver import SemVer
from marketplace.unixfs import Profile
from node.market.block_exchange import PROTOCOL, FetchError, fetch_dag
from node.market.bulk import BulkChannel, BulkError, open_channel
from node.market.registry_dht import DhtRegistry
from node.p2p.framing import ByteStream
from node.p2p.host import P2PError, P2PNode

log = logging.getLogger(__name__)
FETCH_TIMEOUT_S = 3600.0


class NetworkStore:
    """The embedded block store, filled from the DHT's providers of a CID for whatever it lacks.

    Files of an artifact are not announced one by one (py-libp2p limits ADD_PROVIDER to 10 per peer per 10 s):
    the providers of the artifact's envelope serve its files, so they are remembered and asked for the fetches that
    follow without another walk; the DHT is asked only if none of them can serve.
    """

    def __init__(self, local: EmbeddedStore, node: P2PNode, registry: DhtRegistry, *, bulk: bool = True) -> None:
        """`bulk`: ask providers for a bulk channel first (node.market.bulk; else the libp2p block protocol)."""
        self.local, self.node, self.registry, self.bulk = local, node, registry, bulk
        self._session: list[PeerInfo] = []
        self._asked: list[Cid] = []  # every root asked of this store, in order (an artifact's envelope comes first)
        self.fetched_from: dict[str, int] = {}  # peer id -> blocks, over this store's life
        self.failures: dict[str, str] = {}  # peer id -> why it stopped serving
        self._no_bulk: set[ID] = set()  # providers that gave no bulk channel: the libp2p protocol for the rest

    def add(self, path: Path, profile: Profile = "v1-raw", progress: Progress | None = None) -> AddResult:
        """Add a local file to the embedded store."""
        return self.local.add(path, profile, progress)

    def fetch(
        self,
        cid: str | Cid,
        dest: Path,
        progress: Progress | None = None,
        max_bytes: int | None = None,
        first: Sequence[ID] = (),
    ) -> str:
        """Fetch the missing blocks of `cid` from peers (every block verified), then export the file to `dest`;
        returns its sha256 (hashed while it was written).

        `first`: peers known to hold it (e.g. the aggregator that signed a round's result), asked before the DHT's
        providers are looked up; the DHT is the fallback if none of them is connected or serves it all.
        """
        root = Cid.of(cid)
        self._asked.append(root)
        if not self.local.has(root):
            try:
                trio.from_thread.run(self._fetch_remote, root, progress, tuple(first), max_bytes)
            except FetchError as exc:
                raise ContentStoreError(str(exc)) from None
        return self.local.fetch(root, dest, max_bytes=max_bytes)

    def has(self, cid: str | Cid) -> bool:
        """Whether every block of `cid` is stored locally."""
        return self.local.has(cid)

    def cat(self, cid: str | Cid) -> Iterator[bytes]:
        """The bytes of a locally stored file."""
        return self.local.cat(cid)

    def close(self) -> None:
        """Nothing to release."""

    async def _fetch_remote(
        self, root: Cid, progress: Progress | None, first: tuple[ID, ...] = (), max_bytes: int | None = None
    ) -> None:
        connected = [peer for peer in first if peer in self.node.peers() and peer != self.node.peer_id]
        if connected:
            try:
                await self._fetch_from(root, connected, progress, max_bytes)
                return
            except FetchError as exc:  # the blocks it did verify are kept: the providers below fetch only the rest
                log.info("fetch of %s from %s failed (%s); asking the DHT's providers", root, connected, exc)
        if self._session:  # a file of the artifact whose envelope came from these: files are never announced
            reachable = await self._reachable(self._session)
            if reachable:
                try:
                    await self._fetch_from(root, reachable, progress, max_bytes, blame=False)
                    return
                except FetchError as exc:  # e.g. the next artifact of a chain, which they need not hold
                    log.info("fetch of %s from the envelope's providers failed (%s); asking the DHT", root, exc)
        providers = await self._providers(root)
        if not providers:  # a file whose envelope was already here (a pull resumed): its envelope's providers
            for earlier in reversed(self._asked[:-1]):
                if providers := await self._providers(earlier):
                    break
        if not providers:
            raise ContentStoreError(f"no peer provides {root} (is the publisher's node online?)")
        self._session = providers
        reachable = await self._reachable(providers)
        if not reachable:
            raise ContentStoreError(f"none of the {len(providers)} providers of {root} could be reached")
        await self._fetch_from(root, reachable, progress, max_bytes)

    async def _providers(self, cid: Cid) -> list[PeerInfo]:
        """The DHT's providers of `cid`, ourselves left out."""
        return [p for p in await self.registry.providers(cid.multihash) if p.peer_id != self.node.peer_id]

    async def _fetch_from(
        self,
        root: Cid,
        peers: list[ID],
        progress: Progress | None,
        max_bytes: int | None = None,
        blame: bool = True,
    ) -> None:
        """Fetch `root` from `peers`; `blame=False` when they were only guessed to hold it (a failed fetch then
        records none of them as a failed provider)."""

        async def open_stream(peer: ID) -> ByteStream:
            return await self.node.open_stream(peer, PROTOCOL)

        async def open_bulk(peer: ID) -> BulkChannel:
            if peer in self._no_bulk:  # asked already in this pull: each file would ask (and wait) again
                raise BulkError("no bulk channel earlier in this pull")
            try:
                return await open_channel(self.node, peer)
            except BulkError:
                self._no_bulk.add(peer)
                raise

        try:
            with trio.fail_after(FETCH_TIMEOUT_S):
                report = await fetch_dag(
                    root,
                    peers,
                    open_stream,
                    self.local.blocks,
                    progress,
                    max_bytes=max_bytes,
                    open_bulk=open_bulk if self.bulk else None,
                )
        except FetchError as exc:
            if blame:
                self.failures.update(exc.failures)
            raise
        for peer, count in report.served.items():
            self.fetched_from[peer] = self.fetched_from.get(peer, 0) + count
        self.failures.update(report.failures)
        if report.failures:
            log.info("fetched %s; providers that failed: %s", root, report.failures)

    async def _reachable(self, providers: list[PeerInfo]) -> list[ID]:
        """The providers we are connected to, dialling the others (in parallel, bounded)."""
        reachable: list[ID] = []

        async def dial(info: PeerInfo) -> None:
            try:
                await self.node.connect_peer(info)
            except P2PError as exc:
                log.info("provider %s unreachable: %s", info.peer_id, exc)
                return
            reachable.append(info.peer_id)

        async with trio.open_nursery() as nursery:
            for info in providers:
                nursery.start_soon(dial, info)
        return reachable


class DhtResolver:
    """Names resolved through the DHT registry: trusted publishers first, then the highest version; local last."""

    def __init__(self, registry: DhtRegistry, trusted: Callable[[], set[str]], local: NameResolver) -> None:
        self.registry, self.trusted, self.local = registry, trusted, local

    def resolve(self, name: str, version: str | None) -> list[str]:
        """Envelope CIDs for `name` (`version`, or every version), best first: from the records of a lookup of the
        last RECENT_S (a search the user just read) when they hold what is asked, else from a new lookup."""
        records = self.registry.recent(name)
        if not records or (
            version is not None and not any(v.version == version for r in records for v in r.record.versions)
        ):
            records = trio.from_thread.run(self.registry.lookup, name)
        trusted = self.trusted()
        ranked = sorted(
            (
                (r.record.publisher in trusted, SemVer.parse(v.version), v.envelope_cid)
                for r in records
                for v in r.record.versions
                if version is None or v.version == version
            ),
            key=lambda t: (t[0], t[1]),
            reverse=True,
        )
        cids = [cid for _, _, cid in ranked]
        return list(dict.fromkeys(cids + self.local.resolve(name, version)))
