"""The aggregator's side of a round: open it (a signed RoundOpen naming the global it starts from), take updates
until quorum and deadline (or everyone), combine them (a strategy, or a blind CKKS sum), store and provide the
aggregate, announce it (a signed RoundDone); its own update goes in as any member's."""

import logging
import time

import trio

from crypto.he import PublicContext
from federation.descriptor import FederationDescriptor
from federation.messages import sign_round_done, sign_round_open, verify_round_done, verify_round_open
from federation.privacy import combine, update_kind, update_layout
from federation.round import Decision, RoundState
from node.fed import wire as fed_wire
from node.fed.errors import FederationError
from node.fed.rounds.collect import UpdateCollector
from node.fed.rounds.context import RoundContext, describe
from node.fed.rounds.member import Member

log = logging.getLogger(__name__)
POLL_S = 0.5


class Aggregator:
    """This node as the aggregator of a round."""

    def __init__(self, ctx: RoundContext, collector: UpdateCollector, member: Member) -> None:
        self.ctx, self.collector, self.member = ctx, collector, member

    async def round(self, descriptor: FederationDescriptor, r: int, global_round: int) -> None:
        """Open round r, collect, combine and announce it; then wait (a while) for our own copy to be applied."""
        fid, ctx = descriptor.federation_id, self.ctx
        with ctx.events.timed(fid, r, "aggregate_round"):
            await self._round(descriptor, r, global_round)

    async def _round(self, descriptor: FederationDescriptor, r: int, global_round: int) -> None:
        fid, ctx = descriptor.federation_id, self.ctx
        with ctx.events.timed(fid, r, "load_global"):
            if descriptor.uses_he:
                # An HE aggregator never sees the global adapter (it cannot decrypt the aggregates that make it):
                # members train from the global they applied themselves, all from the same signed aggregates.
                global_tensors, cid = await trio.to_thread.run_sync(ctx.initial_global, descriptor), ""
            else:
                global_tensors, cid = await trio.to_thread.run_sync(ctx.global_of, descriptor)
        if cid:
            await ctx.registry.provide(cid)
        deadline = int(time.time() + descriptor.round_deadline_s)
        members = ctx.membership.keys(fid)
        opened = sign_round_open(
            ctx.identity,
            federation_id=fid,
            round=r,
            deadline=deadline,
            global_round=global_round,
            global_cid=cid,
            members=members,
        )
        layout = update_layout(descriptor, global_tensors)
        he_public = ctx.state.he_public(fid) if descriptor.uses_he else None
        context = PublicContext.from_bytes(he_public) if he_public else None
        state = RoundState(
            fid,
            r,
            ctx.membership.keys(fid, "member"),
            descriptor.quorum,
            deadline,
            layout,
            update_kind(descriptor),
            fed_wire.MAX_PAYLOAD,
        )
        self.collector.open(state)
        ctx.state.open_round(fid, r, ctx.identity.fingerprint, cid)
        ctx.gossip(fid, "round.open", opened)
        inbox = ctx.inbox(fid)
        inbox.opens[r] = verify_round_open(opened, fid, members, ctx.membership.candidates(descriptor))
        own_done = trio.Event()
        if ctx.identity.fingerprint in ctx.membership.keys(fid, "member"):
            ctx.spawn(self._own_update, descriptor, r, own_done)  # it may outlive this round's wait
        else:
            own_done.set()
        try:
            while state.ready() is Decision.WAIT:  # woken by each accepted update; the poll catches the deadline
                with trio.move_on_after(max(0.01, min(POLL_S, deadline - time.time() + 0.01))):
                    await inbox.changed.wait()
        finally:
            self.collector.close(fid, r)
        accepted = state.close()
        if len(accepted) < descriptor.quorum:
            raise FederationError(f"only {len(accepted)} of quorum {descriptor.quorum} updates by the deadline")
        updates = [(a.member, a.payload) for a in accepted]  # equal weights (federation.privacy.combine)
        with ctx.events.timed(fid, r, "combine") as measure:
            combined = await trio.to_thread.run_sync(lambda: combine(updates, layout, descriptor, context))
            measure.nbytes = len(combined.payload)
        aggregate_cid = await trio.to_thread.run_sync(ctx.store_bytes, combined.payload)
        await ctx.registry.provide(aggregate_cid)
        done = sign_round_done(
            ctx.identity, federation_id=fid, round=r, aggregate_cid=aggregate_cid, contributors=combined.contributors
        )
        ctx.state.finish_round(fid, r, "aggregated", aggregate_cid=aggregate_cid, contributors=combined.contributors)
        ctx.gossip(fid, "round.done", done)
        inbox.dones[r] = verify_round_done(done, fid, ctx.membership.keys(fid), ctx.membership.candidates(descriptor))
        inbox.poke()
        if ctx.identity.fingerprint not in ctx.membership.keys(fid, "member"):
            if descriptor.uses_he:
                ctx.state.set_global(fid, r, aggregate_cid)  # it cannot decrypt: it only records the round
            else:
                await self.member.apply(descriptor, r, inbox.dones[r], global_tensors)
        with trio.move_on_after(descriptor.round_deadline_s):
            await own_done.wait()  # our own copy of the new global is applied before the next round

    async def _own_update(self, descriptor: FederationDescriptor, r: int, done: trio.Event) -> None:
        """The aggregator's own contribution as a member (its failure only costs its own update)."""
        try:
            await self.member.round(descriptor, r)
        except Exception as exc:
            log.warning("federation %s round %d: our own update failed: %s", descriptor.name, r, describe(exc))
        finally:
            done.set()
