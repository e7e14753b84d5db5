"""Phase timings of rounds, for whoever subscribes (bench/federation.py): a public hook, so nothing is patched."""

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

Phase = Literal[
    "aggregate_round",  # the aggregator's whole round: load the global, open, wait, combine, announce
    "load_global",  # read the global adapter (or the initial one) and its CID
    "combine",  # the strategy over plain updates, or the blind CKKS sum
    "train_and_send",  # a member's part: train, account, release, send
    "train",  # the Trainer call (local training from the global)
    "ledger",  # the privacy budget check and spend record
    "release",  # clip + noise + encode, or encrypt
    "send",  # the update stream to a remote aggregator (its verdict included)
    "apply",  # fetch the aggregate, decode or decrypt, apply, install
    "fetch",  # the aggregate fetched by CID
    "decode",  # the mean update from the aggregate (decode, or decrypt)
    "install",  # the new global installed as the next adapter version
    "personal",  # this member's personal adapter trained over the new global and installed
    "notice_open",  # a RoundOpen first reached this node (started = when it arrived)
    "notice_done",  # a RoundDone first reached this node
]


@dataclass(frozen=True)
class PhaseEvent:
    """One timed phase of one round on this node (unix seconds; bytes moved where that means something)."""

    federation_id: str
    round: int
    phase: Phase
    started: float
    ended: float
    nbytes: int = 0
    ok: bool = True

    @property
    def seconds(self) -> float:
        """Its duration."""
        return self.ended - self.started


PhaseHook = Callable[[PhaseEvent], None]


@dataclass
class Measure:
    """What a timed block may add to its event."""

    nbytes: int = 0


class RoundEvents:
    """Subscribers to phase events. Events are emitted on the trio thread; a hook must be quick and never raise
    (one that does is logged and the round goes on)."""

    def __init__(self) -> None:
        self._hooks: list[PhaseHook] = []

    def subscribe(self, hook: PhaseHook) -> None:
        """Call `hook` with every phase event from now on."""
        self._hooks.append(hook)

    def emit(self, event: PhaseEvent) -> None:
        """Hand `event` to every subscriber."""
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                log.exception("a round event hook failed")

    @contextlib.contextmanager
    def timed(self, federation_id: str, r: int, phase: Phase) -> Iterator[Measure]:
        """Time the block as `phase` of round r (emitted on exit, `ok` False when it raised)."""
        measure, started, ok = Measure(), time.time(), False
        try:
            yield measure
            ok = True
        finally:
            if self._hooks:
                self.emit(PhaseEvent(federation_id, r, phase, started, time.time(), measure.nbytes, ok))
