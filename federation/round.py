"""One federated round at its aggregator: a pure state machine that admits or rejects updates and decides when to act.

Times are unix seconds (the deadline comes from the signed RoundOpen, which every node reads the same way); every
method takes `now`, defaulting to the injected `clock`. An update is accepted if it is on time, for this federation
and round, from a member who signed its header and has not been accepted yet, of the expected kind and layout,
within the size limit, matching its header's digest, and (for plain updates) a finite safetensors update of the
layout. Anything else is returned as `Rejected(reason, detail)` for the node to log; the accepted set is unchanged.
Checks run cheapest and most authenticating first, and `admit_header` runs the header-only ones so that the node can
refuse an update before reading its payload from the stream.
"""

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from federation.messages import (
    Kind,
    MessageError,
    MessageReason,
    UpdateHeader,
    check_update_header,
    choose_aggregator,
    decode_update_header,
)
from federation.quantize import dequantize
from federation.update import Layout, UpdateError, UpdateReason, decode_tensors

Clock = Callable[[], float]
CkksCheck = Callable[[bytes], None]

__all__ = [
    "Accepted",
    "Decision",
    "RejectReason",
    "Rejected",
    "RoundState",
    "choose_aggregator",
]


class RejectReason(StrEnum):
    """Why an update was rejected."""

    WRONG_FEDERATION = "wrong_federation"
    WRONG_ROUND = "wrong_round"
    NOT_A_MEMBER = "not_a_member"
    WRONG_SENDER = "wrong_sender"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    LATE = "late"
    DUPLICATE = "duplicate"
    WRONG_KIND = "wrong_kind"
    WRONG_SHAPE = "wrong_shape"
    OVERSIZED = "oversized"
    BAD_DIGEST = "bad_digest"
    NON_FINITE = "non_finite"


class Decision(StrEnum):
    """What the aggregator should do now."""

    WAIT = "wait"
    AGGREGATE = "aggregate"
    ABANDON = "abandon"


@dataclass(frozen=True)
class Accepted:
    """An accepted update: its header, its payload and (plain updates) its decoded tensors."""

    header: UpdateHeader
    payload: bytes
    tensors: dict[str, np.ndarray] | None = None

    @property
    def member(self) -> str:
        """The member who sent it."""
        return self.header.member


@dataclass(frozen=True)
class Rejected:
    """A rejected update: the reason, a detail for the log, and the member it claimed to come from."""

    reason: RejectReason
    detail: str
    member: str = ""

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" + (f" (from {self.member})" if self.member else "")


_MESSAGE_REASONS = {
    MessageReason.OVERSIZED: RejectReason.OVERSIZED,
    MessageReason.WRONG_FEDERATION: RejectReason.WRONG_FEDERATION,
    MessageReason.NOT_A_MEMBER: RejectReason.NOT_A_MEMBER,
    MessageReason.BAD_SIGNATURE: RejectReason.BAD_SIGNATURE,
}
_UPDATE_REASONS = {
    UpdateReason.MALFORMED: RejectReason.MALFORMED,
    UpdateReason.WRONG_SHAPE: RejectReason.WRONG_SHAPE,
    UpdateReason.NON_FINITE: RejectReason.NON_FINITE,
    UpdateReason.OVERSIZED: RejectReason.OVERSIZED,
}


class RoundState:
    """The aggregator's view of one round: who may send, until when, what shape, and what it accepted so far.

    For "ckks" updates only the kind, size and digest are checked here, plus `ckks_check(payload)` if given (the HE
    module's parser): an UpdateError it raises keeps its reason (e.g. WRONG_SHAPE), anything else is MALFORMED.
    """

    def __init__(
        self,
        federation_id: str,
        round: int,
        members: Mapping[str, str],
        quorum: int,
        deadline: float,
        layout: Layout,
        expected_kind: Kind,
        max_payload_bytes: int,
        ckks_check: CkksCheck | None = None,
        clock: Clock = time.time,
    ) -> None:
        """`members` is {fingerprint: Ed25519 key base64}; `deadline` is unix seconds, like `clock()`."""
        if quorum < 2:
            raise ValueError(f"quorum must be at least 2, got {quorum}")
        if not members:
            raise ValueError("a round needs members")
        if max_payload_bytes < 1:
            raise ValueError(f"max_payload_bytes must be positive, got {max_payload_bytes}")
        self.federation_id = federation_id
        self.round = round
        self.members: dict[str, str] = dict(members)
        self.quorum = quorum
        self.deadline = deadline
        self.layout = layout
        self.expected_kind = expected_kind
        self.max_payload_bytes = max_payload_bytes
        self.ckks_check = ckks_check
        self.clock = clock
        self.rejections: Counter[RejectReason] = Counter()
        self._layout_digest = layout.digest()
        self._accepted: dict[str, Accepted] = {}
        self._closed = False
        # offer() runs in worker threads, one per incoming stream: the accepted set and the counter change under it
        self._lock = threading.RLock()

    @property
    def aggregator(self) -> str:
        """The member chosen to aggregate this round."""
        return choose_aggregator(self.federation_id, self.round, list(self.members))

    def receive(self, header_bytes: bytes, payload: bytes, now: float | None = None) -> Accepted | Rejected:
        """Decode the header bytes and `offer` the update (an undecodable header is MALFORMED)."""
        try:
            header = decode_update_header(header_bytes)
        except MessageError as exc:
            return self._reject(_MESSAGE_REASONS.get(exc.reason, RejectReason.MALFORMED), exc.detail, "")
        return self.offer(header, payload, now)

    def admit_header(
        self, header: UpdateHeader, now: float | None = None, *, sender: str | None = None
    ) -> Rejected | None:
        """The rejection of an update from its header alone (None if its payload is worth reading).

        `sender` is the public key (base64) of the node the update came from, where the transport authenticates it
        (a libp2p stream's peer): a member's update is taken from the member's own node only, not relayed.
        """
        now = self.clock() if now is None else now
        if header.federation_id != self.federation_id:
            return self._reject(RejectReason.WRONG_FEDERATION, f"for federation {header.federation_id[:16]}…", header)
        if header.round != self.round:
            return self._reject(RejectReason.WRONG_ROUND, f"for round {header.round}, not {self.round}", header)
        try:
            check_update_header(header, self.members)
        except MessageError as exc:
            return self._reject(_MESSAGE_REASONS.get(exc.reason, RejectReason.MALFORMED), exc.detail, header)
        if sender is not None and sender != self.members[header.member]:
            return self._reject(RejectReason.WRONG_SENDER, "signed by the member but sent by another node", header)
        if now > self.deadline:
            return self._reject(RejectReason.LATE, f"{now - self.deadline:.1f} s after the deadline", header)
        if self._closed:
            return self._reject(RejectReason.LATE, "the round was already closed for aggregation", header)
        if header.member in self._accepted:
            return self._reject(RejectReason.DUPLICATE, f"round {self.round} already has this member's update", header)
        if header.kind != self.expected_kind:
            detail = f"a {header.kind} update, expected {self.expected_kind}"
            return self._reject(RejectReason.WRONG_KIND, detail, header)
        if header.layout != self._layout_digest:
            return self._reject(RejectReason.WRONG_SHAPE, f"layout {header.layout[:16]}… is not the round's", header)
        if header.payload_len > self.max_payload_bytes:
            detail = f"the payload is {header.payload_len} bytes; the limit is {self.max_payload_bytes}"
            return self._reject(RejectReason.OVERSIZED, detail, header)
        return None

    def offer(
        self, header: UpdateHeader, payload: bytes, now: float | None = None, *, sender: str | None = None
    ) -> Accepted | Rejected:
        """Accept the update (`header` then its `payload`) or return why not; the accepted set changes only if taken."""
        if (rejected := self.admit_header(header, now, sender=sender)) is not None:
            return rejected
        if len(payload) > self.max_payload_bytes:
            detail = f"the payload is {len(payload)} bytes; the limit is {self.max_payload_bytes}"
            return self._reject(RejectReason.OVERSIZED, detail, header)
        if len(payload) != header.payload_len or hashlib.sha256(payload).hexdigest() != header.payload_sha256:
            detail = f"the payload ({len(payload)} bytes) does not match the header's sha256 and length"
            return self._reject(RejectReason.BAD_DIGEST, detail, header)
        try:
            tensors = self._check_payload(payload)
        except UpdateError as exc:
            return self._reject(_UPDATE_REASONS[exc.reason], exc.detail, header)
        except Exception as exc:  # ckks_check parses hostile bytes: whatever it raises is a refusal, not a crash
            return self._reject(RejectReason.MALFORMED, f"ciphertext: {type(exc).__name__}: {exc}", header)
        accepted = Accepted(header, payload, tensors)
        with self._lock:  # checked again: another stream of the same member, or the close, may have come first
            if self._closed:
                return self._reject(RejectReason.LATE, "the round closed while this update was checked", header)
            if header.member in self._accepted:
                detail = f"round {self.round} already has this member's update"
                return self._reject(RejectReason.DUPLICATE, detail, header)
            self._accepted[header.member] = accepted
        return accepted

    def close(self) -> list[Accepted]:
        """Stop accepting (later offers are LATE) and return the accepted updates, in member order."""
        with self._lock:
            self._closed = True
            return self.updates()

    def _check_payload(self, payload: bytes) -> dict[str, np.ndarray] | None:
        if self.expected_kind == "plain":
            return decode_tensors(payload, self.layout, self.max_payload_bytes)
        if self.expected_kind == "q8":
            return dequantize(payload, self.layout, self.max_payload_bytes)
        if self.ckks_check is not None:
            self.ckks_check(payload)
        return None

    def ready(self, now: float | None = None) -> Decision:
        """AGGREGATE once every member sent (with a quorum) or the deadline passed with a quorum; ABANDON if the
        deadline passed (or every member sent) without one; WAIT otherwise."""
        now = self.clock() if now is None else now
        count = len(self._accepted)
        if count == len(self.members) or now > self.deadline:
            return Decision.AGGREGATE if count >= self.quorum else Decision.ABANDON
        return Decision.WAIT

    def updates(self) -> list[Accepted]:
        """The accepted updates, in member order."""
        with self._lock:
            return [self._accepted[member] for member in sorted(self._accepted)]

    def contributors(self) -> list[str]:
        """The members whose updates were accepted, sorted."""
        with self._lock:
            return sorted(self._accepted)

    def _reject(self, reason: RejectReason, detail: str, header: UpdateHeader | str) -> Rejected:
        with self._lock:
            self.rejections[reason] += 1
        member = header if isinstance(header, str) else header.member
        return Rejected(reason, f"round {self.round}: {detail}", member)
