"""A member's side of a round: wait for the RoundOpen, start from the global it names (fetched first if this node
missed rounds), train, account the privacy spend, release, send; then wait for the RoundDone, fetch the aggregate,
decode or decrypt it, apply it and install the new global."""

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trio

from crypto.dp import Spend
from crypto.he import SecretContext
from federation.descriptor import FederationDescriptor
from federation.ledger import DatasetBudget, PrivacyLedger
from federation.messages import Kind, RoundDone, RoundOpen, sign_update_header
from federation.policy import PrivacyPolicy
from federation.privacy import apply_update, delta_of, mean_update, release, update_layout
from federation.update import Layout, decode_tensors, encode_tensors, unflatten
from node.core.fsutil import atomic_write_bytes
from node.fed import wire as fed_wire
from node.fed.adapter import LocalTrainingStopped
from node.fed.errors import FederationError
from node.fed.membership import peer_of
from node.fed.rounds.collect import UpdateCollector
from node.fed.rounds.context import MAX_GLOBAL_BYTES, RoundContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trained:
    """A member's local training result for one round (`spend`: what its DP-SGD run cost, in example-level modes;
    `dataset`: the sha256 of the data file it trained on, '' when unknown)."""

    tensors: dict[str, np.ndarray]
    examples: int
    loss_before: float
    loss_after: float
    spend: Spend | None = None
    dataset: str = ""


# Called with a round's spend and the dataset it touches before training starts; raises when the federation's
# budget or the node's limit for that dataset would not hold.
Account = Callable[[Spend, str], None]
Trainer = Callable[[FederationDescriptor, Mapping[str, np.ndarray], int, threading.Event, Account], Trained]


class Member:
    """This node as a member of rounds: its update out, the aggregate in."""

    def __init__(
        self,
        ctx: RoundContext,
        collector: UpdateCollector,
        trainer: Trainer,
        ledger_path: Path,
        keep_released: bool = False,
        policy: PrivacyPolicy | None = None,
    ) -> None:
        self.ctx, self.collector, self.trainer = ctx, collector, trainer
        self.ledger_path, self.keep_released = ledger_path, keep_released
        self.policy = policy or PrivacyPolicy()

    async def round(self, descriptor: FederationDescriptor, r: int, train: bool = True) -> None:
        """Take part in round r: train and send our update (if `train`), then apply (or, without the HE secret,
        record) the aggregate."""
        fid, ctx = descriptor.federation_id, self.ctx
        inbox = ctx.inbox(fid)
        opened = await inbox.wait(inbox.opens, r, time.time() + 2 * descriptor.round_deadline_s)
        if opened is None:
            raise FederationError(f"no round {r} was opened in time (aggregator offline, or a later round began)")
        global_tensors = await self._base(descriptor, opened)
        if train:
            if global_tensors is None:
                raise FederationError("this member has no HE secret context (it joined as an aggregator?)")
            if time.time() >= opened.deadline:
                raise FederationError(f"round {r} closed before this node could take part")
            with ctx.events.timed(fid, r, "train_and_send"):
                await self._train_and_send(descriptor, r, opened, global_tensors)
        done = await inbox.wait(inbox.dones, r, opened.deadline + descriptor.round_deadline_s / 2)
        if done is None:
            raise FederationError(f"round {r} was not aggregated in time (aggregator offline?)")
        if global_tensors is None:  # an aggregator-only node under HE cannot decrypt: it records the round
            ctx.finish(fid, done, "aggregated")
            ctx.state.set_global(fid, r, done.aggregate_cid)
            return
        await self.apply(descriptor, r, done, global_tensors)

    async def _base(self, descriptor: FederationDescriptor, opened: RoundOpen) -> dict[str, np.ndarray] | None:
        """The global adapter round `opened` starts from, fetched first if this node missed rounds (None: an HE node
        without the secret, which never holds the global). A node that cannot start from it raises."""
        fid, r, ctx = descriptor.federation_id, opened.round, self.ctx
        if descriptor.uses_he and ctx.state.he_secret(fid) is None:
            return None
        row = ctx.state.federation(fid)
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
        with ctx.events.timed(fid, r, "load_global"):
            global_tensors, cid = await trio.to_thread.run_sync(ctx.global_of, descriptor)
        if opened.global_cid and opened.global_cid != cid:
            raise FederationError(f"round {r} starts from {opened.global_cid}, this node holds {cid}")
        return global_tensors

    async def _catch_up(self, descriptor: FederationDescriptor, opened: RoundOpen, held: int) -> None:
        """Fetch the global adapter a round starts from (every block verified against its CID), install it."""
        fid, ctx = descriptor.federation_id, self.ctx
        store = ctx.network_store()

        def fetch() -> dict[str, np.ndarray]:
            with ctx.scratch() as tmp:
                path = Path(tmp) / "global.safetensors"
                first = [peer_of(ctx.membership.keys(fid)[opened.aggregator])]
                store.fetch(opened.global_cid, path, max_bytes=MAX_GLOBAL_BYTES, first=first)
                data = path.read_bytes()
            return decode_tensors(data, Layout.of(ctx.initial_global(descriptor)), MAX_GLOBAL_BYTES)

        tensors = await trio.to_thread.run_sync(fetch)
        version = await trio.to_thread.run_sync(ctx.install_global, descriptor, tensors)
        ctx.state.set_global(fid, opened.global_round, opened.global_cid)
        ctx.status_of[fid].update(adapter=version, caught_up=opened.global_round)
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
        fid, ctx = descriptor.federation_id, self.ctx

        def account(spend: Spend, dataset: str) -> None:
            self._check(descriptor, r, spend, dataset)

        with ctx.events.timed(fid, r, "train"):
            trained = await trio.to_thread.run_sync(self.trainer, descriptor, global_tensors, r, ctx.stop, account)
        layout = update_layout(descriptor, global_tensors)
        he = None
        if descriptor.uses_he:
            secret = ctx.state.he_secret(fid)
            if secret is None:
                raise FederationError("this member has no HE secret context (it joined as an aggregator?)")
            he = SecretContext.from_bytes(secret).public()
        with ctx.events.timed(fid, r, "release") as measure:
            out = await trio.to_thread.run_sync(
                lambda: release(
                    delta_of(trained.tensors, global_tensors, layout), layout, descriptor, he, trained=trained.spend
                )
            )
            measure.nbytes = len(out.payload)
        if out.spend is not None:  # in a worker thread: the first ε computation imports opacus (seconds)
            with ctx.events.timed(fid, r, "ledger"):
                await trio.to_thread.run_sync(self._spend, descriptor, r, out.spend, trained.dataset)
        if self.keep_released:
            await trio.to_thread.run_sync(self._keep, fid, r, out.vector, layout)
        header = sign_update_header(
            ctx.identity,
            federation_id=fid,
            round=r,
            layout_digest=layout.digest(),
            kind=out.kind,
            payload=out.payload,
        )
        if opened.aggregator == ctx.identity.fingerprint:
            verdict = self.collector.offer_local(fid, r, header, out.payload)
        else:
            peer = peer_of(ctx.membership.keys(fid)[opened.aggregator])
            await ctx.dial(peer)
            stream = await ctx.p2p.open_stream(peer, fed_wire.UPDATE_PROTOCOL)
            try:
                with ctx.events.timed(fid, r, "send") as measure:
                    measure.nbytes = len(out.payload)
                    verdict = await fed_wire.send_update(stream, header, out.payload)
            finally:
                await stream.close()
        if not verdict.accepted:
            raise FederationError(f"the aggregator refused our update: {verdict.reason}: {verdict.detail}")

    def _keep(self, fid: str, r: int, vector: np.ndarray, layout: Layout) -> None:
        """Keep our released update (in clear) for audit: federations/<id>/released/r<N>.safetensors, 0600."""
        folder = self.ctx.state.federation_dir(fid) / "released"
        folder.mkdir(mode=0o700, exist_ok=True)
        atomic_write_bytes(folder / f"r{r}.safetensors", encode_tensors(unflatten(vector, layout)), 0o600)

    def _dataset(self, digest: str) -> DatasetBudget:
        """The dataset `digest` with the node's limit on what it may spend."""
        return DatasetBudget(digest, self.policy.max_epsilon_per_dataset, self.policy.max_delta)

    def _check(self, descriptor: FederationDescriptor, r: int, spend: Spend, dataset: str) -> None:
        """Refuse (FederationError) a round whose spend would not fit the federation's budget or the dataset's
        limit, before anything is trained."""
        fid, delta = descriptor.federation_id, descriptor.privacy.dp.delta
        with PrivacyLedger(self.ledger_path) as ledger:
            decision = ledger.check_budget(fid, r, spend, delta, descriptor.epsilon_budget, self._dataset(dataset))
        if not decision.allowed:
            refused = {"round": r, "reason": decision.reason, "epsilon_after": round(decision.epsilon_after, 4)}
            self.ctx.status_of.setdefault(fid, {})["budget_refused"] = refused
            raise FederationError(f"privacy budget: {decision.reason}")

    def _spend(self, descriptor: FederationDescriptor, r: int, spend: Spend, dataset: str) -> None:
        """Check the budgets, then record the spend, before anything is released (refuse past either)."""
        fid, delta = descriptor.federation_id, descriptor.privacy.dp.delta
        on = self._dataset(dataset)
        with PrivacyLedger(self.ledger_path) as ledger:
            decision = ledger.check_budget(fid, r, spend, delta, descriptor.epsilon_budget, on)
            if not decision.allowed:
                raise FederationError(f"privacy budget: {decision.reason}")
            ledger.record(fid, r, spend, delta, budget=descriptor.epsilon_budget, dataset=on)
        self.ctx.status_of.setdefault(fid, {}).update(
            epsilon_spent=round(decision.epsilon_after, 4), epsilon_budget=descriptor.epsilon_budget, delta=delta
        )

    async def apply(
        self, descriptor: FederationDescriptor, r: int, done: RoundDone, global_tensors: dict[str, np.ndarray]
    ) -> None:
        """Fetch round r's aggregate from its aggregator (the DHT's providers as fallback), decode or decrypt the
        mean update, apply it to `global_tensors` and install the new global."""
        fid, ctx = descriptor.federation_id, self.ctx
        with ctx.events.timed(fid, r, "apply"):
            store = ctx.network_store()
            aggregator = peer_of(ctx.membership.keys(fid)[done.aggregator])  # it signed the result and serves it

            def fetch() -> bytes:
                with ctx.scratch() as tmp:
                    path = Path(tmp) / "aggregate.bin"
                    store.fetch(done.aggregate_cid, path, max_bytes=fed_wire.MAX_PAYLOAD, first=[aggregator])
                    return path.read_bytes()

            def decode(payload: bytes) -> dict[str, np.ndarray]:
                secret = ctx.state.he_secret(fid)
                kind: Kind = "ckks" if descriptor.uses_he else "plain"
                context = SecretContext.from_bytes(secret) if secret else None
                layout = update_layout(descriptor, global_tensors)
                return mean_update(kind, payload, len(done.contributors), layout, context)

            def apply(mean: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
                new_global = apply_update(global_tensors, mean)
                return new_global, ctx.store_tensors(new_global)

            with ctx.events.timed(fid, r, "fetch") as measure:
                payload = await trio.to_thread.run_sync(fetch)
                measure.nbytes = len(payload)
            with ctx.events.timed(fid, r, "decode"):
                mean = await trio.to_thread.run_sync(decode, payload)
            new_global, cid = await trio.to_thread.run_sync(apply, mean)
            with ctx.events.timed(fid, r, "install"):
                version = await trio.to_thread.run_sync(ctx.install_global, descriptor, new_global)
            ctx.state.set_global(fid, r, cid)
            ctx.finish(fid, done, "applied")
            ctx.status_of[fid].update(last_applied=r, adapter=version)
        log.info("federation %s: round %d applied (%s)", descriptor.name, r, version)
        if ctx.personalize is not None and ctx.identity.fingerprint in ctx.membership.keys(fid, "member"):
            await self._personalize(descriptor, r, new_global)

    async def _personalize(self, descriptor: FederationDescriptor, r: int, new_global: dict[str, np.ndarray]) -> None:
        """Train this member's personal adapter over the new global; a failure is logged, the rounds go on."""
        fid, ctx = descriptor.federation_id, self.ctx
        assert ctx.personalize is not None
        try:
            with ctx.events.timed(fid, r, "personal"):
                facts = await trio.to_thread.run_sync(ctx.personalize, descriptor, new_global, r, ctx.stop)
        except LocalTrainingStopped:
            return
        except Exception as exc:  # the personal adapter is optional; the federation goes on
            log.warning("federation %s: personal adapter after round %d: %s", descriptor.name, r, exc)
            ctx.status_of[fid].update(personal_error=str(exc)[:300])
            return
        if facts:
            ctx.status_of[fid].update(facts, personal_error=None)
            log.info("federation %s: personal adapter %s trained over round %d", descriptor.name, facts["personal"], r)
