"""An upload cap shared by everything that serves blocks from this node (`[p2p] upload_limit_mbs`).

A token bucket: `reserve(n)` takes n bytes of allowance and returns how long the caller must wait before sending
them (0 while the bucket holds enough). It only computes; the caller sleeps the way its thread sleeps (`time.sleep`
in the bulk channel's threads, `trio.sleep` in the libp2p block server), so one bucket serves both.
"""

import threading
import time
from collections.abc import Callable

BURST_S = 0.25  # the allowance that may go out at once: a quarter second of the rate


class UploadLimit:
    """`rate` bytes per second on average over all callers; `rate` 0 means no limit."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0:
            raise ValueError(f"an upload limit is a rate >= 0, got {rate}")
        self.rate, self.clock = rate, clock
        self._burst = rate * BURST_S
        self._level = self._burst  # bytes that may go out now (negative: owed)
        self._at = clock()
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> float:
        """Take `nbytes` of allowance; the seconds to wait before sending them."""
        if self.rate == 0:
            return 0.0
        with self._lock:
            now = self.clock()
            self._level = min(self._burst, self._level + (now - self._at) * self.rate)
            self._at = now
            self._level -= nbytes
            return max(0.0, -self._level / self.rate)


def limit_of(mb_per_s: float) -> UploadLimit:
    """The UploadLimit of a `[p2p] upload_limit_mbs` value (MB/s, 10**6 bytes; 0: none)."""
    return UploadLimit(mb_per_s * 1e6)
