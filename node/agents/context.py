"""The `context` an agent's `analyze` gets: the event, and the node's memory, model and tools.

`analyze` runs under its own asyncio loop in a worker thread (node.tools.userland); each method here hands its work
to the daemon's trio loop (trio.from_thread with the loop's token) from a helper thread, so the agent's loop keeps
running meanwhile and the work runs where the node's parts live."""

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from node.sdk import Event

T = TypeVar("T")

Search = Callable[[str, int, str], Awaitable[list[str]]]
Complete = Callable[[str, int], Awaitable[str]]
CallTool = Callable[[str, dict[str, Any]], Awaitable[str]]


@dataclass
class AgentContext:
    """What `analyze(context)` gets (the node.sdk.Context protocol)."""

    event: Event
    agent: str
    token: trio.lowlevel.TrioToken
    _search: Search
    _complete: Complete
    _tool: CallTool

    async def _on_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        def bridged() -> T:
            return trio.from_thread.run(fn, *args, trio_token=self.token)

        return await asyncio.to_thread(bridged)

    async def search(self, query: str, k: int = 5, namespace: str = "default") -> Sequence[str]:
        """The texts of the memories closest to `query` in `namespace` (none when memory is off)."""
        return await self._on_trio(self._search, query, k, namespace)

    async def complete(self, prompt: str, max_tokens: int = 256) -> str:
        """The node's model's answer to `prompt` (a user message)."""
        return await self._on_trio(self._complete, prompt, max_tokens)

    async def tool(self, name: str, **arguments: Any) -> str:
        """Run one of the node's tools; its result text (a refusal raises node.tools.registry.ToolRefused)."""
        return await self._on_trio(self._tool, name, arguments)
