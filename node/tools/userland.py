"""Running the user's own code (tools, agents) from the daemon's trio loop without letting it slow anything else.

Each call runs in a worker thread under its own asyncio loop: user code is written against asyncio libraries far more
often than trio, and a thread keeps a function that blocks (time.sleep, a busy loop) off the loop that serves chats.
The asyncio loop cancels the coroutine at the timeout; a function that ignores cancellation (or blocks without
awaiting) is abandoned by the caller at the timeout plus a grace second: its thread ends when it ends, holding one of
`MAX_RUNNING` slots meanwhile, so at worst user code stops running, never the node."""

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

MAX_RUNNING = 8
GRACE_S = 1.0
_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("user_code_slots")


class UserCodeTimeout(Exception):
    """User code ran past its time."""


def _slots() -> trio.CapacityLimiter:
    """This trio run's slots (a RunVar: tests start several runs in one process)."""
    try:
        return _limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(MAX_RUNNING)
        _limiter.set(limiter)
        return limiter


async def run_user_code(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout_s: float) -> Any:
    """fn(*args, **kwargs) (a coroutine function or a plain one) in a worker thread, bounded by `timeout_s`;
    UserCodeTimeout past it, the function's own exception otherwise."""

    name = getattr(fn, "__qualname__", repr(fn))

    def in_thread() -> Any:
        if inspect.iscoroutinefunction(fn):

            async def bounded() -> Any:
                try:
                    async with asyncio.timeout(timeout_s) as limit:
                        return await fn(*args, **kwargs)
                except TimeoutError:
                    if limit.expired():
                        raise UserCodeTimeout(f"{name} ran past {timeout_s:g} s and was cancelled") from None
                    raise

            return asyncio.run(bounded())
        return fn(*args, **kwargs)

    with trio.move_on_after(timeout_s + GRACE_S) as scope:
        return await trio.to_thread.run_sync(in_thread, abandon_on_cancel=True, limiter=_slots())  # type: ignore[call-arg]  # mypy misreads trio 0.35 stubs (TypeVarTuple)
    assert scope.cancelled_caught
    log.warning("user code %s ignored cancellation and was abandoned after %.1f s", name, timeout_s + GRACE_S)
    raise UserCodeTimeout(f"{name} ran past {timeout_s:g} s and did not stop: abandoned")
