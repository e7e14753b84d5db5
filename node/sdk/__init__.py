"""The `mirador` module that user tools and agents import: `@mirador.tool`, `@mirador.agent`, `Alert`, `Event`,
`Context`.

The daemon provides the name: before it runs a file of `MIRADOR_HOME/tools/` or `agents/`, `sys.modules["mirador"]`
is this module (node.tools.loader). Outside the daemon (a user's own tests of a tool), `from node import sdk as
mirador` is the same module. Nothing here imports the rest of the node: a decorator only marks what it decorates;
the loader finds the marks in the module's namespace.

    import mirador

    @mirador.tool(description="Today's exchange rate")
    async def rate(currency: str) -> float:
        ...

    @mirador.agent
    class Spending:
        triggers = ["daily", "on_transaction", "threshold:balance < 100"]

        async def analyze(self, context: mirador.Context) -> mirador.Alert | None:
            ...
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, overload

__all__ = ["Alert", "Context", "Event", "agent", "tool"]

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)

TOOL_MARK = "__mirador_tool__"
AGENT_MARK = "__mirador_agent__"


@dataclass(frozen=True)
class ToolMark:
    """What `@mirador.tool` recorded: the tool's name and description (None: the docstring's first paragraph)."""

    name: str
    description: str | None
    timeout_s: float | None


@dataclass(frozen=True)
class AgentMark:
    """What `@mirador.agent` recorded: the agent's name and its run timeout (None: the node's default)."""

    name: str
    timeout_s: float | None


@overload
def tool(fn: F, /) -> F: ...
@overload
def tool(
    *, description: str | None = None, name: str | None = None, timeout_s: float | None = None
) -> Callable[[F], F]: ...
def tool(
    fn: F | None = None,
    /,
    *,
    description: str | None = None,
    name: str | None = None,
    timeout_s: float | None = None,
) -> F | Callable[[F], F]:
    """Mark a function (async or not, type-hinted) as a tool; its parameters' schema comes from the signature."""

    def mark(f: F) -> F:
        setattr(f, TOOL_MARK, ToolMark(name or f.__name__, description, timeout_s))
        return f

    return mark(fn) if fn is not None else mark


@overload
def agent(cls: C, /) -> C: ...
@overload
def agent(*, name: str | None = None, timeout_s: float | None = None) -> Callable[[C], C]: ...
def agent(cls: C | None = None, /, *, name: str | None = None, timeout_s: float | None = None) -> C | Callable[[C], C]:
    """Mark a class as an agent: `triggers` (a list of strings) and `analyze(self, context)` returning an Alert or
    None."""

    def mark(c: C) -> C:
        setattr(c, AGENT_MARK, AgentMark(name or c.__name__, timeout_s))
        return c

    return mark(cls) if cls is not None else mark


@dataclass(frozen=True)
class Alert:
    """What an agent reports; kept in state.db, listed by `mirador agents alerts`, streamed by GET /v1/events."""

    title: str
    body: str = ""
    level: Literal["info", "warning", "critical"] = "info"


@dataclass(frozen=True)
class Event:
    """Something that happened: a schedule's tick (`schedule`), a threshold crossing (`threshold`), an emitted
    event (its name), or a built-in one (`memory.added`, `feedback.given`, `adapter.installed`,
    `federation.round_applied`, `file.changed`)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    at: float = 0.0  # unix time
    source: str = "node"


class Context(Protocol):
    """What `analyze` gets: the event that woke the agent, and the node's memory, model and tools."""

    event: Event
    agent: str

    async def search(self, query: str, k: int = 5, namespace: str = "default") -> Sequence[str]:
        """The texts of the memories closest to `query` in `namespace`."""
        ...

    async def complete(self, prompt: str, max_tokens: int = 256) -> str:
        """The node's model's answer to `prompt` (a user message)."""
        ...

    async def tool(self, name: str, **arguments: Any) -> str:
        """Run one of the node's tools and return its result text."""
        ...
