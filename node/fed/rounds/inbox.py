"""Round notices (RoundOpen, RoundDone) received for one federation, and waiting for one of them."""

import time
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from federation.messages import RoundDone, RoundOpen

SUPERSEDED_GRACE_S = 5.0  # a round still unseen this long after a later round opened is over for this node

T = TypeVar("T", RoundOpen, RoundDone)


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

    async def wait(self, box: dict[int, T], r: int, until: float) -> T | None:
        """box[r] once it arrives; None at `until`, or SUPERSEDED_GRACE_S after a later round opened (r is over)."""
        newer_since: float | None = None
        while r not in box:
            now = time.time()
            if newer_since is None and self.newer_open(r):
                newer_since = now
            if newer_since is not None:
                until = min(until, newer_since + SUPERSEDED_GRACE_S)
            left = until - now
            if left <= 0:
                return None
            with trio.move_on_after(min(left, 5)):
                await self.changed.wait()
        return box[r]
