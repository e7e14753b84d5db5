"""The aggregator's receiving side of /mirador/fed/update/1.0.0: the rounds open on this node and the updates
offered to them, over a stream or (its own) locally."""

import functools
import logging
from collections.abc import Callable
from typing import Any

import trio

from crypto.signed import key_fingerprint
from federation.messages import MessageError, UpdateHeader, decode_update_header
from federation.round import Accepted, Rejected, RoundState
from node.fed import wire as fed_wire
from node.fed.membership import key_of
from node.p2p.host import Libp2pStream

log = logging.getLogger(__name__)
ROUND_CLOSED = "round_closed"  # an update's verdict when no round is open here for its (federation, round)


class UpdateCollector:
    """Rounds this node aggregates, by (federation, round), and the updates offered to them."""

    def __init__(self, state: Any, accepted: Callable[[str], None]) -> None:
        """`state` is the FederationStore (refusals are recorded there); `accepted(fid)` is called on the trio thread
        after each accepted update (the aggregating task may have all it waits for)."""
        self.state, self.accepted = state, accepted
        self.rounds: dict[tuple[str, int], RoundState] = {}

    def open(self, round_state: RoundState) -> None:
        """Take updates for `round_state` from now on."""
        self.rounds[(round_state.federation_id, round_state.round)] = round_state

    def close(self, fid: str, r: int) -> None:
        """Take no more updates for round r (later offers are answered `round_closed`)."""
        self.rounds.pop((fid, r), None)

    def offer_local(self, fid: str, r: int, header: bytes, payload: bytes) -> fed_wire.Verdict:
        """Offer this node's own update (it aggregates the round it trains in)."""
        round_state = self.rounds.get((fid, r))
        if round_state is None:
            return fed_wire.Verdict(accepted=False, reason=ROUND_CLOSED)
        result = round_state.receive(header, payload)
        if isinstance(result, Accepted):
            self.accepted(fid)
        return verdict_of(result)

    def _record(self, header: UpdateHeader, sender: str, reason: str, detail: str) -> None:
        """Record a refused update under the node that sent it (authenticated by the stream's Noise handshake), never
        under the member its header names: an outsider must not be able to write refusals in a member's name."""
        if sender != header.member:
            detail = f"claimed to be from {header.member}: {detail}"
        self.state.reject(header.federation_id, header.round, sender, reason, detail)

    def _reject_closed(self, header: UpdateHeader, sender: str, detail: str) -> None:
        """Record an update for a round not open here, if the federation is ours (another's id names nothing)."""
        if self.state.federation(header.federation_id) is not None:
            self._record(header, sender, ROUND_CLOSED, detail)

    async def serve(self, stream: Libp2pStream) -> None:
        """Receive one member's update for an open round: the header is judged first (a refused update's payload is
        never read), then the payload, at most the size the signed header declared; answer with the verdict. A broken
        stream raises (P2PNode's handler guard logs it and scores the peer)."""
        header_bytes = await fed_wire.read_header(stream)
        try:
            header = decode_update_header(header_bytes)
        except MessageError as exc:
            verdict = fed_wire.Verdict(accepted=False, reason="malformed", detail=str(exc)[:1000])
            await fed_wire.send_verdict(stream, verdict)
            return
        sender = key_of(stream.remote_peer)
        sent_by = key_fingerprint(sender) or f"peer {stream.remote_peer}"
        round_state = self.rounds.get((header.federation_id, header.round))
        if round_state is None:
            detail = f"round {header.round}: no such round of federation {header.federation_id[:16]}… is open"
            await trio.to_thread.run_sync(self._reject_closed, header, sent_by, detail)
            log.info("round %s: rejected an update: %s: %s", header.round, ROUND_CLOSED, detail)
            await fed_wire.send_verdict(stream, fed_wire.Verdict(accepted=False, reason=ROUND_CLOSED, detail=detail))
            return
        refused = round_state.admit_header(header, sender=sender)
        if refused is None:
            payload = await fed_wire.ask_payload(stream, header.payload_len)
            offer = functools.partial(round_state.offer, header, payload, sender=sender)
            result: Accepted | Rejected = await trio.to_thread.run_sync(offer)
        else:
            result = refused
        if isinstance(result, Rejected):
            await trio.to_thread.run_sync(self._record, header, sent_by, str(result.reason), result.detail)
            log.info("round %s: rejected an update: %s", header.round, result)
        else:
            self.accepted(header.federation_id)
        await fed_wire.send_verdict(stream, verdict_of(result))


def verdict_of(result: Accepted | Rejected) -> fed_wire.Verdict:
    """The wire verdict for an admission result."""
    if isinstance(result, Accepted):
        return fed_wire.Verdict(accepted=True)
    return fed_wire.Verdict(accepted=False, reason=str(result.reason), detail=result.detail[:1000])
