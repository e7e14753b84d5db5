"""A token bucket on an injectable monotonic clock (inbound per-peer limits and our own outgoing pace)."""

import time

import trio

from node.p2p.notices.codec import _EPSILON, Clock, Sleep


class TokenBucket:
    """`rate` tokens per second up to `burst`, on an injectable monotonic clock; starts full."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._stamp) * self.rate)
        self._stamp = now

    @property
    def tokens(self) -> float:
        """Tokens available now."""
        self._refill()
        return self._tokens

    def try_take(self) -> bool:
        """Take one token if there is one."""
        self._refill()
        if self._tokens < 1 - _EPSILON:
            return False
        self._tokens = max(0.0, self._tokens - 1)
        return True

    def wait_s(self) -> float:
        """Seconds until a token is available (0 if one is)."""
        return max(0.0, (1 - self.tokens) / self.rate)

    async def take(self, sleep: Sleep = trio.sleep) -> None:
        """Wait (with `sleep`) until a token is available, then take it."""
        while not self.try_take():
            await sleep(self.wait_s())
