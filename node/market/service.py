"""The daemon's marketplace on the network: announce what this node publishes, search the DHT, pull from peers.

The CLI publishes into MIRADOR_HOME itself (signing, block store, registry) and then asks the running daemon to
announce; pulls of names go through the daemon because only it holds the libp2p host. The synchronous Marketplace
runs in a worker thread with its own SQLite connection; network steps go back to the trio loop.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from crypto.identity import Identity
from marketplace.artifacts import ArtifactRefused, Installed, LocalResolver, Marketplace, describe
from marketplace.content_store import EmbeddedStore
from marketplace.registry import Registry
from marketplace.semver import SemVer
from node.core.home import NodeHome
from node.market.block_exchange import BlockServer
from node.market.bulk import BulkServer
from node.market.install import InstallRefused, install_pulled_adapter
from node.market.network_store import DhtResolver, NetworkStore
from node.market.notices import ArtifactPublished
from node.market.rate_limit import limit_of
from node.market.registry_dht import DhtRegistry
from node.p2p.host import P2PNode
from node.p2p.notices import NoticeBacklog, NoticeBoard, NoticeError

log = logging.getLogger(__name__)
ANNOUNCE_TIMEOUT_S = 60.0
REANNOUNCE_INTERVAL_S = 6 * 3600.0
PROVIDE_PACE_S = 1.2  # py-libp2p accepts 10 ADD_PROVIDER per peer per 10 s; stay under it when re-announcing
PullProgress = Callable[[str, int, int], None]


class MarketUnavailable(Exception):
    """The network marketplace needs the P2P host and the embedded store; the message says what is missing."""


@dataclass
class PullOutcome:
    """A finished pull: the artifact and, for adapters, what installing it did."""

    installed: Installed
    install_note: str
    install_error: str
    providers: dict[str, int]  # peer id -> blocks it served
    provider_failures: dict[str, str]  # peer id -> why it stopped

    def document(self) -> dict[str, Any]:
        """The JSON the API returns."""
        return describe(self.installed) | {
            "install": self.install_note,
            "install_error": self.install_error,
            "providers": self.providers,
            "provider_failures": self.provider_failures,
        }


class MarketService:
    """Announce, search and pull over the node's DHT and block exchange."""

    def __init__(
        self,
        home: NodeHome,
        identity: Identity,
        p2p: P2PNode,
        registry: DhtRegistry,
        notices: NoticeBoard | None,
        *,
        bulk: bool = True,
        bulk_port: int = 0,
        upload_limit_mbs: float = 0.0,
    ) -> None:
        self.home, self.identity, self.p2p, self.registry, self.notices = home, identity, p2p, registry, notices
        self.local = EmbeddedStore(home.root / "blocks")
        upload = limit_of(upload_limit_mbs) if upload_limit_mbs > 0 else None
        self.server = BlockServer(self.local.blocks, upload=upload)
        self.server.attach(p2p)
        self.bulk = BulkServer(self.local.blocks, p2p.config.listen_host, bulk_port, upload=upload) if bulk else None
        if self.bulk is not None:
            self.bulk.attach(p2p)
        self._pull_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.pulls_done = 0
        self.pulls_failed = 0
        self.providing = 0  # pulled artifacts whose provider announcement is still under way
        self.last_announce: float | None = None

    def status(self) -> dict[str, Any]:
        """What the network marketplace has done (for /v1/node/status)."""
        return {
            "enabled": True,
            "pulls_done": self.pulls_done,
            "pulls_failed": self.pulls_failed,
            "providing": self.providing,
            "last_announce": self.last_announce,
            "block_streams_served": self.server.streams_served,
            "blocks_served": self.server.blocks_served,
            "block_streams_refused": self.server.streams_refused,
            "bulk_channels_served": self.bulk.channels_served if self.bulk else None,
            "bulk_blocks_served": self.bulk.blocks_served if self.bulk else None,
            "bulk_channels_refused": self.bulk.channels_refused if self.bulk else None,
            "bulk_busy": self.bulk.busy if self.bulk else None,
        }

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve blocks, re-announce what this node holds every few hours, run pulls; until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.reannounce_forever)
                task_status.started()
                await trio.sleep_forever()
        finally:
            if self.bulk is not None:
                self.bulk.stop()

    def start_soon(self, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` in the service's nursery (it outlives the HTTP request that started it)."""
        if self._nursery is None:
            raise MarketUnavailable("the marketplace service is not running")
        self._nursery.start_soon(job)

    def _published(self) -> dict[str, dict[str, str]]:
        """name -> version -> envelope CID of what this node published (its own key)."""
        out: dict[str, dict[str, str]] = {}
        db = Registry(self.home.state_db)
        try:
            for record in db.artifacts():
                if record.publisher == self.identity.fingerprint:
                    out.setdefault(record.name, {})[record.version] = record.root_cid
        finally:
            db.close()
        return out

    async def announce(self, name: str) -> dict[str, Any]:
        """Put the signed record of our versions of `name` into the DHT and provide their envelopes."""
        versions = (await trio.to_thread.run_sync(self._published)).get(name)
        if not versions:
            raise ArtifactRefused(f"this node has published nothing named {name!r}")
        with trio.fail_after(ANNOUNCE_TIMEOUT_S):
            await self.registry.announce(name, versions)
            for cid in versions.values():
                await self.registry.provide(cid)
        self.last_announce = time.time()
        await self._notify(name, versions)
        return {"name": name, "versions": sorted(versions), "peers": len(self.p2p.peers())}

    async def _notify(self, name: str, versions: dict[str, str]) -> None:
        """Tell peers by gossip that the newest of `versions` is out (best effort: the DHT holds the truth)."""
        if self.notices is None:
            return
        version = max(versions, key=SemVer.parse)
        db = Registry(self.home.state_db)
        try:
            record = db.find(name, version)
        finally:
            db.close()
        kind: Any = record.kind if record is not None else "model"  # validated by the notice's own check
        notice = ArtifactPublished(
            name=name, version=version, kind=kind, publisher=self.identity.fingerprint, envelope_cid=versions[version]
        )
        try:
            with trio.move_on_after(ANNOUNCE_TIMEOUT_S):
                await self.notices.publish(notice)
        except (NoticeBacklog, NoticeError) as exc:
            log.warning("no gossip notice for %s@%s: %s", name, version, exc)

    async def reannounce_forever(self) -> None:
        """Announce every published name and provide every installed artifact, now and every few hours."""
        while True:
            try:
                await self._reannounce()
            except Exception as exc:  # a network hiccup must not stop the daemon; the next round retries
                log.warning("re-announcing artifacts failed: %s", exc)
            await trio.sleep(REANNOUNCE_INTERVAL_S)

    async def _reannounce(self) -> None:
        published = await trio.to_thread.run_sync(self._published)
        for name, versions in published.items():
            with trio.move_on_after(ANNOUNCE_TIMEOUT_S):
                await self.registry.announce(name, versions)
            await trio.sleep(PROVIDE_PACE_S)
        for cid in await trio.to_thread.run_sync(self._installed_cids):
            with trio.move_on_after(ANNOUNCE_TIMEOUT_S):
                await self.registry.provide(cid)
            await trio.sleep(PROVIDE_PACE_S)

    def _installed_cids(self) -> list[str]:
        db = Registry(self.home.state_db)
        try:
            return [r.root_cid for r in db.artifacts() if self.local.has(r.root_cid)]
        finally:
            db.close()

    async def search(self, name: str) -> list[dict[str, Any]]:
        """Every version of `name` that any publisher announced, with the publisher's trust here."""
        records = await self.registry.lookup(name)
        trusted = await trio.to_thread.run_sync(self._trusted)
        rows = [
            {
                "name": r.record.name,
                "version": v.version,
                "publisher": r.record.publisher,
                "trusted": r.record.publisher in trusted,
                "envelope_cid": v.envelope_cid,
                "record_seq": r.record.seq,
                "expires": r.record.expires,
            }
            for r in records
            for v in r.record.versions
        ]
        return sorted(rows, key=lambda row: (not row["trusted"], row["publisher"], row["version"]))

    def _trusted(self) -> set[str]:
        db = Registry(self.home.state_db)
        try:
            return {t.fingerprint for t in db.trusted()} | {self.identity.fingerprint}
        finally:
            db.close()

    async def pull(
        self,
        target: str,
        *,
        trust_publisher: bool,
        install: bool,
        progress: PullProgress | None = None,
        replace_publisher: bool = False,
    ) -> PullOutcome:
        """Resolve `target` through the DHT, fetch from providers, verify, install; return, and provide it ourselves
        in the background (the user is told first; `providing` in the status counts announcements under way)."""
        async with self._pull_lock:
            try:
                outcome = await trio.to_thread.run_sync(
                    self._pull_sync, target, trust_publisher, install, progress, replace_publisher
                )
            except BaseException:
                self.pulls_failed += 1
                raise
            self.pulls_done += 1
        self.providing += 1
        if self._nursery is None:
            await self._provide(outcome.installed.envelope_cid)
        else:
            self._nursery.start_soon(self._provide, outcome.installed.envelope_cid)
        return outcome

    async def _provide(self, cid: str) -> None:
        try:
            with trio.move_on_after(ANNOUNCE_TIMEOUT_S):
                await self.registry.provide(cid)
        except Exception as exc:  # the next re-announcement retries
            log.warning("announcing %s as provided here failed: %s", cid, exc)
        finally:
            self.providing -= 1

    def _pull_sync(
        self,
        target: str,
        trust_publisher: bool,
        install: bool,
        progress: PullProgress | None,
        replace_publisher: bool = False,
    ) -> PullOutcome:
        db = Registry(self.home.state_db)
        try:
            store = NetworkStore(self.local, self.p2p, self.registry, bulk=self.bulk is not None)
            resolver = DhtResolver(self.registry, self._trusted, LocalResolver(db))
            market = Marketplace(self.home.root / "artifacts", store, db, self.identity, resolver)
            started = time.monotonic()
            done = market.pull(
                target, trust_publisher=trust_publisher, replace_publisher=replace_publisher, progress=progress
            )
            log.info("pulled %s in %.1f s from %s", target, time.monotonic() - started, store.fetched_from)
        finally:
            db.close()
        note, error = "", ""
        if install and done.manifest.kind == "adapter":
            try:
                note = install_pulled_adapter(self.home, done)
            except InstallRefused as exc:
                error = str(exc)
        return PullOutcome(done, note, error, store.fetched_from, store.failures)
