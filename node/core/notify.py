"""How a part of the node tells the event bus (node.agents.events) that something happened, without importing it:
a `notify(name, data)` attribute the daemon sets to the bus's emit; `ignore` until then (the CLI, tests)."""

from collections.abc import Callable
from typing import Any

Notify = Callable[[str, dict[str, Any]], None]


def ignore(name: str, data: dict[str, Any]) -> None:
    """Tell no one."""
