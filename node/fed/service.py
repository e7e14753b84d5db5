"""Federated rounds over the P2P layer, inside the daemon: create, join, and run every federation this node is in.

Per federation, every node runs the same loop for round r = (last finished round) + 1:
1. The round's aggregator is `choose_aggregator(federation, r, candidates)` — every node under `dp`; under HE only
   the aggregator-only nodes, which hold the public CKKS context and never the secret one.
2. The aggregator signs a RoundOpen (deadline = now + round_deadline_s, the global adapter's CID) and gossips it.
3. Each training member that sees it trains from the global adapter on its own data (the training subprocess, nice
   19), checks its privacy budget in the ledger (refusing to release past it), records the spend, releases its
   update (federation.privacy) and sends it over a framed stream to the aggregator.
4. The aggregator admits or rejects each update (federation.round, reasons logged), and at quorum + deadline (or
   when everyone sent) combines them (a strategy, or a blind CKKS sum), adds the aggregate to its content store,
   provides it in the DHT and gossips a signed RoundDone. Without quorum the round is abandoned.
5. Members fetch the aggregate by CID from the providers (every block verified), decrypt it under HE, apply it to
   the global adapter and install the new global as the next version of the adapter `fed-<name>`: it serves at
   once. A round with no RoundOpen or no RoundDone in time is abandoned by each node on its own; the next round
   (another aggregator) starts from the same global adapter. Nothing local is ever half-written: globals are
   files written atomically and installed through the adapter store.

This module is the loop and the dispatch; the stages live in node/fed/rounds/: `aggregator` (2, 4), `collect` (the
update stream's receiving end), `member` (3, 5), and `events` (phase timings for subscribers).
"""

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import trio

from crypto.identity import Identity
from crypto.refusal import Refused
from federation.descriptor import FederationDescriptor, verify_admission
from federation.messages import choose_aggregator, verify_round_done, verify_round_open
from federation.policy import PrivacyPolicy
from marketplace.content_store import EmbeddedStore
from node.core.fsutil import remove_stale
from node.fed import wire as fed_wire
from node.fed.join import JoinProtocol
from node.fed.membership import Membership
from node.fed.notices import FederationNotice
from node.fed.rounds.aggregator import Aggregator
from node.fed.rounds.collect import UpdateCollector
from node.fed.rounds.context import SCRATCH_PREFIX, Personalize, RoundContext, describe
from node.fed.rounds.events import Phase, PhaseEvent, RoundEvents
from node.fed.rounds.member import Member, Trained, Trainer
from node.market.registry_dht import DhtRegistry
from node.p2p.host import P2PNode
from node.p2p.notices import NoticeBoard

__all__ = ["FederationService", "PhaseEvent", "RoundEvents", "Trained", "Trainer"]

log = logging.getLogger(__name__)


class FederationService:
    """Runs every federation this node is in (see the module docstring): the join and update protocols, the
    federation notices, and per federation the round loop, which takes the aggregator's or a member's part."""

    def __init__(
        self,
        root: Path,
        identity: Identity,
        p2p: P2PNode,
        notices: NoticeBoard,
        registry: DhtRegistry,
        local: EmbeddedStore,
        state: Any,  # node.fed.store.FederationStore
        ledger_path: Path,
        trainer: Trainer,
        install_global: Callable[[FederationDescriptor, Mapping[str, np.ndarray]], str],
        initial_global: Callable[[FederationDescriptor], dict[str, np.ndarray]],
        keep_released: bool = False,
        policy: PrivacyPolicy | None = None,
        personalize: Personalize | None = None,
    ) -> None:
        self.root, self.identity, self.p2p, self.notices, self.state = root, identity, p2p, notices, state
        self._nursery: trio.Nursery | None = None
        self._running: set[str] = set()
        self.membership = Membership(state)
        self.ctx = RoundContext(
            root=root,
            identity=identity,
            p2p=p2p,
            registry=registry,
            local=local,
            state=state,
            membership=self.membership,
            install_global=install_global,
            initial_global=initial_global,
            gossip=self._gossip,
            dial=self._dial,
            spawn=self._spawn,
            personalize=personalize,
        )
        self.joins = JoinProtocol(identity, p2p, state, self.membership, self._gossip, self._dial)
        self.collector = UpdateCollector(state, self._accepted)
        self.member = Member(self.ctx, self.collector, trainer, ledger_path, keep_released, policy)
        self.aggregator = Aggregator(self.ctx, self.collector, self.member)

    @property
    def events(self) -> RoundEvents:
        """Phase timings of every round on this node: `service.events.subscribe(hook)`."""
        return self.ctx.events

    @property
    def status_of(self) -> dict[str, dict[str, Any]]:
        """Per federation, what its loop is doing (phase, round, aggregator, last applied, ε spent)."""
        return self.ctx.status_of

    # lifecycle -----------------------------------------------------------------------------------------------------
    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the join and update protocols, listen to federation notices, run each active federation."""
        remove_stale(self.root, SCRATCH_PREFIX)
        self.p2p.set_stream_handler(fed_wire.JOIN_PROTOCOL, self.joins.serve)
        self.p2p.set_stream_handler(fed_wire.UPDATE_PROTOCOL, self.collector.serve)
        self.notices.on(FederationNotice, self._on_notice)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for row in self.state.federations():
                    self.start(row.descriptor)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self.ctx.stop.set()  # before the nursery waits: a training job in a worker thread is terminated
        finally:
            self.ctx.stop.set()

    def start(self, descriptor: FederationDescriptor) -> None:
        """Run the round loop of `descriptor` (once)."""
        fid = descriptor.federation_id
        if self._nursery is None or fid in self._running:
            return
        self._running.add(fid)
        self.ctx.inbox(fid)
        self._nursery.start_soon(self._loop, descriptor)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    # membership ----------------------------------------------------------------------------------------------------
    async def join(self, descriptor_bytes: bytes, via: str, role: str, invite: bytes | None) -> FederationDescriptor:
        """Join the federation of `descriptor_bytes` through the member with key `via` (base64), then run it."""
        descriptor = await self.joins.join(descriptor_bytes, via, role, invite)
        self.start(descriptor)
        return descriptor

    async def _on_notice(self, notice: FederationNotice, origin: str) -> None:
        """Route a federation notice, verified against the federation's members before use."""
        arrived = time.time()
        row = self.state.federation(notice.federation_id)
        if row is None:
            return
        data = fed_wire.unb64(notice.data, "notice")
        descriptor = row.descriptor
        fid = descriptor.federation_id
        inbox = self.ctx.inbox(fid)
        keys, candidates = self.membership.keys(fid), self.membership.candidates(descriptor)
        try:
            if notice.kind == "member":  # a join request and the creator's admission of it
                request, admission = fed_wire.decode_admitted(data)
                member = verify_admission(descriptor, request, admission)
                self.state.add_member(fid, member, request, admission)
            elif notice.kind == "round.open":
                opened = verify_round_open(data, fid, keys, candidates)
                if opened.round not in inbox.opens:
                    self._arrived(fid, opened.round, "notice_open", arrived)
                inbox.opens[opened.round] = opened
            else:
                done = verify_round_done(data, fid, keys, candidates)
                if done.round not in inbox.dones:
                    self._arrived(fid, done.round, "notice_done", arrived)
                inbox.dones[done.round] = done
        except Refused as exc:  # a forged, stale or conflicting notice (MemberConflictError included)
            log.info("federation %s: refused a %s notice: %s", descriptor.name, notice.kind, exc)
            return
        inbox.poke()

    def _arrived(self, fid: str, r: int, phase: Phase, arrived: float) -> None:
        """Emit the first arrival of a round notice (started = when it arrived, ended = when it was verified)."""
        self.events.emit(PhaseEvent(fid, r, phase, arrived, time.time()))

    def _gossip(self, fid: str, kind: str, data: bytes) -> None:
        """Publish a federation notice from the loop (fire and forget; the notice board paces it)."""
        if self._nursery is not None:
            notice = FederationNotice(federation_id=fid, kind=kind, data=fed_wire.b64(data))  # type: ignore[arg-type]
            self._nursery.start_soon(self.notices.publish, notice)

    def _accepted(self, fid: str) -> None:
        """An update was accepted: wake the aggregating task (it may have all it waits for)."""
        if fid in self.ctx.inboxes:
            self.ctx.inboxes[fid].poke()

    async def _dial(self, peer: Any) -> None:
        """Connect to a member's peer (through the DHT if we do not know its addresses)."""
        if peer in self.p2p.peers():
            return
        info = None
        if self.p2p.dht is not None:
            with trio.move_on_after(10):
                info = await self.p2p.dht.find_peer(peer)
        if info is None:
            from libp2p.peer.peerinfo import PeerInfo

            info = PeerInfo(peer, self.p2p.host.get_peerstore().addrs(peer))
        await self.p2p.connect_peer(info)

    # rounds --------------------------------------------------------------------------------------------------------
    async def _loop(self, descriptor: FederationDescriptor) -> None:
        fid, ctx = descriptor.federation_id, self.ctx
        inbox = ctx.inbox(fid)
        status = ctx.status_of.setdefault(fid, {"name": descriptor.name, "phase": "starting"})
        self._recover(fid)
        while not ctx.stop.is_set():
            row = self.state.federation(fid)
            if row is None or row.left_at is not None:
                return
            last = self.state.last_round(fid)
            r = max(row.global_round, last.round if last is not None else 0) + 1
            r = max(r, max(inbox.opens, default=0))  # a later round is open: this node missed some, it joins that one
            inbox.prune(r)
            trainers = self.membership.keys(fid, "member")
            if len(trainers) < descriptor.min_members or not self.membership.candidates(descriptor):
                status["phase"] = f"waiting for members ({len(trainers)} of {descriptor.min_members})"
                with trio.move_on_after(5):
                    await inbox.changed.wait()
                continue
            aggregator = choose_aggregator(fid, r, list(self.membership.candidates(descriptor)))
            status.update(phase="round", round=r, aggregator=aggregator)
            try:
                if aggregator == self.identity.fingerprint:
                    await self.aggregator.round(descriptor, r, row.global_round)
                else:
                    await self.member.round(descriptor, r, train=self.identity.fingerprint in trainers)
            except Exception as exc:  # one failed round must never stop the node: it is recorded and skipped
                log.warning("federation %s round %d abandoned here: %s", descriptor.name, r, describe(exc))
                ctx.abandon(fid, r, describe(exc))
                status["last_abandoned"] = {"round": r, "reason": describe(exc)[:300]}

    def _recover(self, fid: str) -> None:
        """Rounds left open by a previous run of this node are over for it: record them as abandoned."""
        for row in self.state.rounds(fid, 20):
            if row.status == "open":
                self.ctx.abandon(fid, row.round, "this node stopped during the round")
