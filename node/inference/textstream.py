"""Turning a token stream into text: incremental UTF-8 decoding and stop-string matching with hold-back."""

import codecs
from collections.abc import Sequence


class StopMatcher:
    """Finds the first stop string in streamed text, holding back any tail that could start one.

    `push` returns (text safe to emit now, whether a stop string was hit); after a hit, the emitted text
    ends right before the stop string, as OpenAI's API does.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add `text`; return what can be emitted and whether a stop string has appeared."""
        buf = self._pending + text
        first = -1
        for stop in self.stops:
            i = buf.find(stop)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self._pending = ""
            return buf[:first], True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return (buf[: len(buf) - hold] if hold else buf), False

    def flush(self) -> str:
        """Text still held back when generation ended without a stop string."""
        out, self._pending = self._pending, ""
        return out


class Utf8Stream:
    """Decodes token bytes as they come; a character split across tokens is emitted once complete."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        """Decode what is complete so far."""
        return self._dec.decode(data)

    def flush(self) -> str:
        """Decode what is left at the end (an incomplete character becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)
