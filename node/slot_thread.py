"""A long-lived OS thread per llama.cpp slot, awaited from trio.

Measured (docs/BENCHMARKS.md): llama.cpp's OpenMP build keeps one thread team per calling thread. Calling
`llama_decode` from a different pool thread per job (as `trio.to_thread.run_sync` does) built new teams and left
old ones spinning: generation fell from ~120 to 65-85 tok/s on 2 cores. One persistent thread per slot keeps one
team per slot and runs at the speed of a bare loop.
"""

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")
_STOP = object()


class SlotThread:
    """Runs blocking calls one at a time on its own thread; `await run(fn, ...)` waits for the result."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args, report = item
            try:
                outcome: tuple[bool, Any] = (True, fn(*args))
            except BaseException as exc:
                outcome = (False, exc)
            report(outcome)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on this thread and return its result (or raise its exception).

        The wait is shielded: a blocking call cannot be interrupted, so its caller always sees it finish.
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[tuple[bool, Any]] = []

        def report(outcome: tuple[bool, Any]) -> None:
            box.append(outcome)
            token.run_sync_soon(done.set)

        self._queue.put((fn, args, report))
        with trio.CancelScope(shield=True):
            await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        result: T = value
        return result

    def close(self) -> None:
        """Finish queued calls, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout=30)
