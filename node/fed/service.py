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
"""

import functools
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from crypto.dp import Spend
from crypto.he import PublicContext, SecretContext
from crypto.identity import Identity
from federation.descriptor import (
    FederationDescriptor,
    FederationRefused,
    verify_admitted,
)
from federation.ledger import PrivacyLedger
from federation.messages import (
    Kind,
    MessageError,
    RoundDone,
    RoundOpen,
    UpdateHeader,
    choose_aggregator,
    decode_update_header,
    sign_round_done,
    sign_round_open,
    sign_update_header,
    verify_round_done,
    verify_round_open,
)
from federation.privacy import apply_update, combine, delta_of, mean_update, release
from federation.round import Accepted, Decision, Rejected, RoundState
from federation.update import Layout, decode_tensors, encode_tensors
from marketplace.content_store import EmbeddedStore
from node.core.fsutil import remove_stale
from node.fed import wire as fed_wire
from node.fed.errors import FederationError
from node.fed.join import JoinProtocol
from node.fed.membership import Membership, key_of, peer_of
from node.fed.notices import FederationNotice
from node.fed.store import RoundStatus
from node.market.network_store import NetworkStore
from node.market.registry_dht import DhtRegistry
from node.p2p.framing import FrameError
from node.p2p.host import Libp2pStream, P2PNode
from node.p2p.notices import NoticeBoard

log = logging.getLogger(__name__)
POLL_S = 0.5
SCRATCH_PREFIX = ".fed-scratch-"
ROUND_CLOSED = "round_closed"  # an update's verdict when no round is open here for its (federation, round)
SUPERSEDED_GRACE_S = 5.0  # a round still unseen this long after a later round opened is over for this node
MAX_GLOBAL_BYTES = 256 * 1024 * 1024


@dataclass
class Inbox:
    """Round notices received for one federation, by round."""

    opens: dict[int, RoundOpen] = field(default_factory=dict)
    dones: dict[int, RoundDone] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    def poke(self) -> None:
        """Wake whoever waits for a notice."""
        self.changed.set()
        self.changed = trio.Event()

    def prune(self, current: int, keep: int = 8) -> None:
        """Forget notices of rounds long before `current`."""
        for box in (self.opens, self.dones):
            for old in [k for k in box if k < current - keep]:
                del box[old]

    def newer_open(self, r: int) -> bool:
        """Whether a round after `r` has been opened."""
        return any(k > r for k in self.opens)


@dataclass(frozen=True)
class Trained:
    """A member's local training result for one round."""

    tensors: dict[str, np.ndarray]
    examples: int
    loss_before: float
    loss_after: float


Trainer = Callable[[FederationDescriptor, Mapping[str, np.ndarray], int, threading.Event], Trained]


class FederationService:
    """Runs every federation this node is in (see the module docstring)."""

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
    ) -> None:
        self.keep_released = keep_released
        self.root, self.identity, self.p2p, self.notices = root, identity, p2p, notices
        self.registry, self.local, self.state, self.ledger_path = registry, local, state, ledger_path
        self.trainer, self.install_global, self.initial_global = trainer, install_global, initial_global
        self.inboxes: dict[str, Inbox] = {}
        self.rounds: dict[tuple[str, int], RoundState] = {}
        self.status_of: dict[str, dict[str, Any]] = {}
        self._nursery: trio.Nursery | None = None
        self._stop = threading.Event()
        self._running: set[str] = set()
        self.membership = Membership(state)
        self.joins = JoinProtocol(identity, p2p, state, self._gossip, self._dial)

    # lifecycle -----------------------------------------------------------------------------------------------------
    def _scratch(self) -> "tempfile.TemporaryDirectory[str]":
        """A scratch folder in the node's home (removed after use; by the next start if the node was killed)."""
        return tempfile.TemporaryDirectory(dir=self.root, prefix=SCRATCH_PREFIX)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the join and update protocols, listen to federation notices, run each active federation."""
        remove_stale(self.root, SCRATCH_PREFIX)
        self.p2p.set_stream_handler(fed_wire.JOIN_PROTOCOL, self.joins.serve)
        self.p2p.set_stream_handler(fed_wire.UPDATE_PROTOCOL, self._serve_update)
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
                    self._stop.set()  # before the nursery waits: a training job in a worker thread is terminated
        finally:
            self._stop.set()

    def start(self, descriptor: FederationDescriptor) -> None:
        """Run the round loop of `descriptor` (once)."""
        fid = descriptor.federation_id
        if self._nursery is None or fid in self._running:
            return
        self._running.add(fid)
        self.inboxes.setdefault(fid, Inbox())
        self._nursery.start_soon(self._loop, descriptor)

    # membership ----------------------------------------------------------------------------------------------------
    async def join(self, descriptor_bytes: bytes, via: str, role: str, invite: bytes | None) -> FederationDescriptor:
        """Join the federation of `descriptor_bytes` through the member with key `via` (base64), then run it."""
        descriptor = await self.joins.join(descriptor_bytes, via, role, invite)
        self.start(descriptor)
        return descriptor

    async def _on_notice(self, notice: FederationNotice, origin: str) -> None:
        """Route a federation notice, verified against the federation's members before use."""
        row = self.state.federation(notice.federation_id)
        if row is None:
            return
        data = fed_wire.unb64(notice.data, "notice")
        descriptor = row.descriptor
        fid = descriptor.federation_id
        inbox = self.inboxes.setdefault(fid, Inbox())
        try:
            if notice.kind == "member":
                member = verify_admitted(descriptor, data)
                self.state.add_member(fid, member, data)
            elif notice.kind == "round.open":
                opened = verify_round_open(data, fid, self.membership.keys(fid), self.membership.candidates(descriptor))
                inbox.opens[opened.round] = opened
            else:
                done = verify_round_done(data, fid, self.membership.keys(fid), self.membership.candidates(descriptor))
                inbox.dones[done.round] = done
        except (FederationRefused, MessageError) as exc:
            log.info("federation %s: refused a %s notice: %s", descriptor.name, notice.kind, exc)
            return
        inbox.poke()

    def _gossip(self, fid: str, kind: str, data: bytes) -> None:
        """Publish a federation notice from the loop (fire and forget; the notice board paces it)."""
        if self._nursery is not None:
            notice = FederationNotice(federation_id=fid, kind=kind, data=fed_wire.b64(data))  # type: ignore[arg-type]
            self._nursery.start_soon(self.notices.publish, notice)

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
        fid = descriptor.federation_id
        inbox = self.inboxes[fid]
        status = self.status_of.setdefault(fid, {"name": descriptor.name, "phase": "starting"})
        self._recover(fid)
        while not self._stop.is_set():
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
                    await self._aggregate_round(descriptor, r, row.global_round)
                else:
                    await self._member_round(descriptor, r, train=self.identity.fingerprint in trainers)
            except Exception as exc:  # one failed round must never stop the node: it is recorded and skipped
                log.warning("federation %s round %d abandoned here: %s", descriptor.name, r, _describe(exc))
                self._abandon(fid, r, _describe(exc))
                status["last_abandoned"] = {"round": r, "reason": _describe(exc)[:300]}

    def _recover(self, fid: str) -> None:
        """Rounds left open by a previous run of this node are over for it: record them as abandoned."""
        for row in self.state.rounds(fid, 20):
            if row.status == "open":
                self._abandon(fid, row.round, "this node stopped during the round")

    def _finish(self, fid: str, done: RoundDone, status: RoundStatus) -> None:
        """Record the round `done` announced, as `status` ('aggregated' where the aggregate cannot be applied)."""
        self.state.finish_round(
            fid,
            done.round,
            status,
            aggregate_cid=done.aggregate_cid,
            contributors=list(done.contributors),
            aggregator=done.aggregator,
        )

    def _abandon(self, fid: str, r: int, reason: str) -> None:
        """Record round r as abandoned on this node (unless it was finished meanwhile)."""
        last = self.state.last_round(fid)
        if last is not None and last.round == r and last.status in ("applied", "aggregated"):
            return
        try:
            self.state.finish_round(fid, r, "abandoned", reason=reason[:1000])
        except ValueError as exc:
            log.info("round %d: %s", r, exc)

    async def _wait(self, inbox: Inbox, box: dict[int, Any], r: int, until: float) -> Any:
        """box[r] once it arrives; None at `until`, or SUPERSEDED_GRACE_S after a later round opened (r is over)."""
        newer_since: float | None = None
        while r not in box:
            now = time.time()
            if newer_since is None and inbox.newer_open(r):
                newer_since = now
            if newer_since is not None:
                until = min(until, newer_since + SUPERSEDED_GRACE_S)
            left = until - now
            if left <= 0:
                return None
            with trio.move_on_after(min(left, 5)):
                await inbox.changed.wait()
        return box[r]

    def _global(self, descriptor: FederationDescriptor) -> tuple[dict[str, np.ndarray], str]:
        """The current global adapter tensors and their CID (round 0: the deterministic initial adapter)."""
        row = self.state.federation(descriptor.federation_id)
        if row is not None and row.global_cid:
            data = b"".join(self.local.cat(row.global_cid))
            tensors = decode_tensors(data, Layout.of(self.initial_global(descriptor)), MAX_GLOBAL_BYTES)
            return tensors, row.global_cid
        tensors = self.initial_global(descriptor)
        return tensors, self._store_tensors(tensors)

    def _store_tensors(self, tensors: Mapping[str, np.ndarray]) -> str:
        with self._scratch() as tmp:
            path = Path(tmp) / "adapter.safetensors"
            path.write_bytes(encode_tensors(dict(tensors)))
            return self.local.add(path).cid

    async def _aggregate_round(self, descriptor: FederationDescriptor, r: int, global_round: int) -> None:
        fid = descriptor.federation_id
        if descriptor.uses_he:
            # An HE aggregator never sees the global adapter (it cannot decrypt the aggregates that make it):
            # members train from the global they applied themselves, all from the same signed aggregates.
            global_tensors, cid = await trio.to_thread.run_sync(self.initial_global, descriptor), ""
        else:
            global_tensors, cid = await trio.to_thread.run_sync(self._global, descriptor)
            await self.registry.provide(cid)
        deadline = int(time.time() + descriptor.round_deadline_s)
        opened = sign_round_open(
            self.identity,
            federation_id=fid,
            round=r,
            deadline=deadline,
            global_round=global_round,
            global_cid=cid,
            members=self.membership.keys(fid),
        )
        layout = Layout.of(global_tensors)
        he_public = self.state.he_public(fid) if descriptor.uses_he else None
        context = PublicContext.from_bytes(he_public) if he_public else None
        state = RoundState(
            fid,
            r,
            self.membership.keys(fid, "member"),
            descriptor.quorum,
            deadline,
            layout,
            "ckks" if descriptor.uses_he else "plain",
            fed_wire.MAX_PAYLOAD,
        )
        self.rounds[(fid, r)] = state
        self.state.open_round(fid, r, self.identity.fingerprint, cid)
        self._gossip(fid, "round.open", opened)
        self.inboxes[fid].opens[r] = verify_round_open(
            opened, fid, self.membership.keys(fid), self.membership.candidates(descriptor)
        )
        own_done = trio.Event()
        if self.identity.fingerprint in self.membership.keys(fid, "member"):
            self._nursery.start_soon(self._own_update, descriptor, r, own_done)  # type: ignore[union-attr]
        else:
            own_done.set()
        inbox = self.inboxes[fid]
        while state.ready() is Decision.WAIT:  # woken by each accepted update; the poll catches the deadline
            with trio.move_on_after(max(0.01, min(POLL_S, deadline - time.time() + 0.01))):
                await inbox.changed.wait()
        del self.rounds[(fid, r)]
        accepted = state.close()
        if len(accepted) < descriptor.quorum:
            raise FederationError(f"only {len(accepted)} of quorum {descriptor.quorum} updates by the deadline")
        updates = [(a.member, a.payload, a.header.num_examples) for a in accepted]
        combined = await trio.to_thread.run_sync(lambda: combine(updates, layout, descriptor, context))
        aggregate_cid = await trio.to_thread.run_sync(self._store_payload, combined.payload)
        await self.registry.provide(aggregate_cid)
        done = sign_round_done(
            self.identity, federation_id=fid, round=r, aggregate_cid=aggregate_cid, contributors=combined.contributors
        )
        self.state.finish_round(fid, r, "aggregated", aggregate_cid=aggregate_cid, contributors=combined.contributors)
        self._gossip(fid, "round.done", done)
        self.inboxes[fid].dones[r] = verify_round_done(
            done, fid, self.membership.keys(fid), self.membership.candidates(descriptor)
        )
        self.inboxes[fid].poke()
        if self.identity.fingerprint not in self.membership.keys(fid, "member"):
            if descriptor.uses_he:
                self.state.set_global(fid, r, aggregate_cid)  # it cannot decrypt: it only records the round
            else:
                await self._apply(descriptor, r, self.inboxes[fid].dones[r], global_tensors)
        with trio.move_on_after(descriptor.round_deadline_s):
            await own_done.wait()  # our own copy of the new global is applied before the next round

    def _store_payload(self, payload: bytes) -> str:
        with self._scratch() as tmp:
            path = Path(tmp) / "aggregate.bin"
            path.write_bytes(payload)
            return self.local.add(path).cid

    async def _own_update(self, descriptor: FederationDescriptor, r: int, done: trio.Event) -> None:
        """The aggregator's own contribution as a member (its failure only costs its own update)."""
        try:
            await self._member_round(descriptor, r)
        except Exception as exc:
            log.warning("federation %s round %d: our own update failed: %s", descriptor.name, r, _describe(exc))
        finally:
            done.set()

    async def _member_round(self, descriptor: FederationDescriptor, r: int, train: bool = True) -> None:
        """Take part in round r: train and send our update (if `train`), then apply (or, without the HE secret,
        record) the aggregate."""
        fid = descriptor.federation_id
        inbox = self.inboxes[fid]
        opened = await self._wait(inbox, inbox.opens, r, time.time() + 2 * descriptor.round_deadline_s)
        if opened is None:
            raise FederationError(f"no round {r} was opened in time (aggregator offline, or a later round began)")
        global_tensors = await self._base(descriptor, opened)
        if train:
            if global_tensors is None:
                raise FederationError("this member has no HE secret context (it joined as an aggregator?)")
            if time.time() >= opened.deadline:
                raise FederationError(f"round {r} closed before this node could take part")
            await self._train_and_send(descriptor, r, opened, global_tensors)
        done = await self._wait(inbox, inbox.dones, r, opened.deadline + descriptor.round_deadline_s / 2)
        if done is None:
            raise FederationError(f"round {r} was not aggregated in time (aggregator offline?)")
        if global_tensors is None:  # an aggregator-only node under HE cannot decrypt: it records the round
            self._finish(fid, done, "aggregated")
            self.state.set_global(fid, r, done.aggregate_cid)
            return
        await self._apply(descriptor, r, done, global_tensors)

    async def _base(self, descriptor: FederationDescriptor, opened: RoundOpen) -> dict[str, np.ndarray] | None:
        """The global adapter round `opened` starts from, fetched first if this node missed rounds (None: an HE node
        without the secret, which never holds the global). A node that cannot start from it raises."""
        fid, r = descriptor.federation_id, opened.round
        if descriptor.uses_he and self.state.he_secret(fid) is None:
            return None
        row = self.state.federation(fid)
        held = row.global_round if row is not None else 0
        if opened.global_round < held:
            raise FederationError(
                f"round {r} starts from the global of round {opened.global_round}, this node applied round {held}"
            )
        if opened.global_round > held:
            if not opened.global_cid:
                raise FederationError(
                    f"this node missed rounds {held + 1}..{opened.global_round} and under HE their global cannot be "
                    "fetched (only members can decrypt it); it sits out until it rejoins"
                )
            await self._catch_up(descriptor, opened, held)
        global_tensors, cid = await trio.to_thread.run_sync(self._global, descriptor)
        if opened.global_cid and opened.global_cid != cid:
            raise FederationError(f"round {r} starts from {opened.global_cid}, this node holds {cid}")
        return global_tensors

    async def _catch_up(self, descriptor: FederationDescriptor, opened: RoundOpen, held: int) -> None:
        """Fetch the global adapter a round starts from (every block verified against its CID), install it."""
        fid = descriptor.federation_id
        store = NetworkStore(self.local, self.p2p, self.registry)

        def fetch() -> dict[str, np.ndarray]:
            with self._scratch() as tmp:
                path = Path(tmp) / "global.safetensors"
                store.fetch(opened.global_cid, path, first=[peer_of(self.membership.keys(fid)[opened.aggregator])])
                data = path.read_bytes()
            return decode_tensors(data, Layout.of(self.initial_global(descriptor)), MAX_GLOBAL_BYTES)

        tensors = await trio.to_thread.run_sync(fetch)
        version = await trio.to_thread.run_sync(self.install_global, descriptor, tensors)
        self.state.set_global(fid, opened.global_round, opened.global_cid)
        self.status_of[fid].update(adapter=version, caught_up=opened.global_round)
        log.info(
            "federation %s: missed rounds %d..%d, caught up to the global of round %d (%s)",
            descriptor.name,
            held + 1,
            opened.global_round,
            opened.global_round,
            version,
        )

    async def _train_and_send(
        self, descriptor: FederationDescriptor, r: int, opened: RoundOpen, global_tensors: dict[str, np.ndarray]
    ) -> None:
        fid = descriptor.federation_id
        trained = await trio.to_thread.run_sync(self.trainer, descriptor, global_tensors, r, self._stop)
        layout = Layout.of(global_tensors)
        he = None
        if descriptor.uses_he:
            secret = self.state.he_secret(fid)
            if secret is None:
                raise FederationError("this member has no HE secret context (it joined as an aggregator?)")
            he = SecretContext.from_bytes(secret).public()
        out = await trio.to_thread.run_sync(
            lambda: release(delta_of(trained.tensors, global_tensors), layout, descriptor, he)
        )
        if out.spend is not None:  # in a worker thread: the first ε computation imports opacus (seconds)
            await trio.to_thread.run_sync(self._spend, descriptor, r, out.spend)
        if self.keep_released:
            await trio.to_thread.run_sync(self._keep, fid, r, out.vector, layout)
        header = sign_update_header(
            self.identity,
            federation_id=fid,
            round=r,
            layout_digest=layout.digest(),
            kind=out.kind,
            payload=out.payload,
            num_examples=max(1, trained.examples),
        )
        if opened.aggregator == self.identity.fingerprint:
            verdict = self._offer_local(fid, r, header, out.payload)
        else:
            peer = peer_of(self.membership.keys(fid)[opened.aggregator])
            await self._dial(peer)
            stream = await self.p2p.open_stream(peer, fed_wire.UPDATE_PROTOCOL)
            try:
                verdict = await fed_wire.send_update(stream, header, out.payload)
            finally:
                await stream.close()
        if not verdict.accepted:
            raise FederationError(f"the aggregator refused our update: {verdict.reason}: {verdict.detail}")

    def _keep(self, fid: str, r: int, vector: np.ndarray, layout: Layout) -> None:
        """Keep our released update (in clear) for audit: federations/<id>/released/r<N>.safetensors, 0600."""
        from federation.update import unflatten
        from node.core.fsutil import atomic_write_bytes

        folder = self.state.federation_dir(fid) / "released"
        folder.mkdir(mode=0o700, exist_ok=True)
        atomic_write_bytes(folder / f"r{r}.safetensors", encode_tensors(unflatten(vector, layout)), 0o600)

    def _spend(self, descriptor: FederationDescriptor, r: int, spend: Spend) -> None:
        """Check the budget, then record the spend, before anything is released (refuse past the budget)."""
        fid, delta = descriptor.federation_id, descriptor.privacy.dp.delta
        with PrivacyLedger(self.ledger_path) as ledger:
            decision = ledger.check_budget(fid, r, spend, delta, descriptor.epsilon_budget)
            if not decision.allowed:
                raise FederationError(f"privacy budget: {decision.reason}")
            ledger.record(fid, r, spend, delta, budget=descriptor.epsilon_budget)
        self.status_of.setdefault(fid, {}).update(
            epsilon_spent=round(decision.epsilon_after, 4), epsilon_budget=descriptor.epsilon_budget, delta=delta
        )

    def _offer_local(self, fid: str, r: int, header: bytes, payload: bytes) -> fed_wire.Verdict:
        state = self.rounds.get((fid, r))
        if state is None:
            return fed_wire.Verdict(accepted=False, reason=ROUND_CLOSED)
        verdict = state.receive(header, payload)
        if isinstance(verdict, Accepted):
            self.inboxes[fid].poke()  # called on the loop: wake the aggregating task
        return _verdict(verdict)

    def _reject_closed(self, header: UpdateHeader, detail: str) -> None:
        """Record an update for a round not open here, if the federation is ours (another's id names nothing)."""
        if self.state.federation(header.federation_id) is not None:
            self.state.reject(header.federation_id, header.round, header.member, ROUND_CLOSED, detail)

    async def _serve_update(self, stream: Libp2pStream) -> None:
        """Receive one member's update for an open round: the header is judged first (a refused update's payload is
        never read), then the payload, at most the size the signed header declared; answer with the verdict."""
        try:
            header_bytes = await fed_wire.read_header(stream)
            try:
                header = decode_update_header(header_bytes)
            except MessageError as exc:
                verdict = fed_wire.Verdict(accepted=False, reason="malformed", detail=str(exc)[:1000])
                await fed_wire.send_verdict(stream, verdict)
                return
            state = self.rounds.get((header.federation_id, header.round))
            if state is None:
                detail = f"round {header.round}: no such round of federation {header.federation_id[:16]}… is open"
                await trio.to_thread.run_sync(self._reject_closed, header, detail)
                log.info("round %s: rejected an update: %s: %s", header.round, ROUND_CLOSED, detail)
                await fed_wire.send_verdict(
                    stream, fed_wire.Verdict(accepted=False, reason=ROUND_CLOSED, detail=detail)
                )
                return
            sender = key_of(stream.remote_peer)
            refused = state.admit_header(header, sender=sender)
            if refused is None:
                payload = await fed_wire.ask_payload(stream, header.payload_len)
                offer = functools.partial(state.offer, header, payload, sender=sender)
                result: Accepted | Rejected = await trio.to_thread.run_sync(offer)
            else:
                result = refused
            if isinstance(result, Rejected):
                reason, detail = str(result.reason), result.detail
                await trio.to_thread.run_sync(
                    self.state.reject, header.federation_id, header.round, header.member, reason, detail
                )
                log.info("round %s: rejected an update: %s", header.round, result)
            elif header.federation_id in self.inboxes:
                self.inboxes[header.federation_id].poke()  # the aggregator may have all it waits for
            await fed_wire.send_verdict(stream, _verdict(result))
        except (FrameError, fed_wire.WireError) as exc:
            log.info("update stream refused: %s", exc)

    async def _apply(
        self, descriptor: FederationDescriptor, r: int, done: RoundDone, global_tensors: dict[str, np.ndarray]
    ) -> None:
        fid = descriptor.federation_id
        store = NetworkStore(self.local, self.p2p, self.registry)
        aggregator = peer_of(self.membership.keys(fid)[done.aggregator])  # it signed the result and serves it

        def fetch_and_apply() -> tuple[dict[str, np.ndarray], str]:
            with self._scratch() as tmp:
                path = Path(tmp) / "aggregate.bin"
                store.fetch(done.aggregate_cid, path, first=[aggregator])
                payload = path.read_bytes()
            layout = Layout.of(global_tensors)
            secret = self.state.he_secret(fid)
            kind: Kind = "ckks" if descriptor.uses_he else "plain"
            context = SecretContext.from_bytes(secret) if secret else None
            mean = mean_update(kind, payload, len(done.contributors), layout, context)
            new_global = apply_update(global_tensors, mean)
            return new_global, self._store_tensors(new_global)

        new_global, cid = await trio.to_thread.run_sync(fetch_and_apply)
        version = await trio.to_thread.run_sync(self.install_global, descriptor, new_global)
        self.state.set_global(fid, r, cid)
        self._finish(fid, done, "applied")
        self.status_of[fid].update(last_applied=r, adapter=version)
        log.info("federation %s: round %d applied (%s)", descriptor.name, r, version)


def _describe(exc: BaseException) -> str:
    """One line for an error, looking inside exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _verdict(result: Accepted | Rejected) -> fed_wire.Verdict:
    if isinstance(result, Accepted):
        return fed_wire.Verdict(accepted=True)
    return fed_wire.Verdict(accepted=False, reason=str(result.reason), detail=result.detail[:1000])
