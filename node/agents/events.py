"""The node's event bus: events emitted from any thread (a memory added in a worker thread, POST /v1/events on the
loop) are delivered on the daemon's trio loop to the handlers (the agents) and to the listeners of GET /v1/events.

A listener that does not keep up loses events, never slows the emitter: each has a bounded buffer, and what does
not fit is counted as `dropped` and reported to it."""

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from node.sdk import Event

log = logging.getLogger(__name__)

LISTENER_BUFFER = 256
MAX_LISTENERS = 32


class Listener:
    """One GET /v1/events stream's end of the bus."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[Event](LISTENER_BUFFER)
        self.dropped = 0


class EventBus:
    """Emit from anywhere; handlers and listeners run on the trio loop `bind` was called on."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._token: trio.lowlevel.TrioToken | None = None
        self._handlers: list[Callable[[Event], None]] = []
        self._listeners: set[Listener] = set()
        self.emitted = 0

    def bind(self) -> None:
        """Deliver on the current trio loop from now on (the daemon calls it at start)."""
        self._token = trio.lowlevel.current_trio_token()

    def on(self, handler: Callable[[Event], None]) -> None:
        """Call `handler(event)` on the loop for every event (it must not block)."""
        self._handlers.append(handler)

    def emit(self, name: str, data: dict[str, Any] | None = None, source: str = "node") -> Event:
        """Emit an event from any thread; dropped (logged at debug) when no loop is bound or it has stopped."""
        event = Event(name, dict(data or {}), self.clock(), source)
        if self._token is None:
            log.debug("event %s: no loop bound, dropped", name)
            return event
        try:
            here = trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:
            here = False
        if here:
            self._deliver(event)
        else:
            try:
                self._token.run_sync_soon(self._deliver, event)
            except trio.RunFinishedError:
                log.debug("event %s: the loop has stopped, dropped", name)
        return event

    def _deliver(self, event: Event) -> None:
        self.emitted += 1
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:
                log.exception("event %s: a handler failed", event.name)
        for listener in list(self._listeners):
            try:
                listener.send.send_nowait(event)
            except trio.WouldBlock:
                listener.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._listeners.discard(listener)

    def listen(self) -> Listener:
        """A new listener (an SSE stream), until `unlisten`; RuntimeError past MAX_LISTENERS."""
        if len(self._listeners) >= MAX_LISTENERS:
            raise RuntimeError(f"{MAX_LISTENERS} event streams are open already")
        listener = Listener()
        self._listeners.add(listener)
        return listener

    def listeners(self) -> int:
        """How many listeners are open."""
        return len(self._listeners)

    def unlisten(self, listener: Listener) -> None:
        """Stop delivering to `listener`."""
        self._listeners.discard(listener)
        listener.send.close()
