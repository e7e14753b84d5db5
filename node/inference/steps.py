"""What a generation of several steps yields (the node's tool loop, a chain): pieces of the answer, the end of each
step's job, and side events (a tool call, a chain step's result) that an API shows beside the answer."""

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from node.inference.engine import Job


@dataclass(frozen=True)
class Text:
    """A piece of the final answer."""

    text: str


@dataclass(frozen=True)
class StepDone:
    """One generation ended (its job carries the finish reason, token counts and any error)."""

    job: Job
    final: bool


class SideEvent(Protocol):
    """An event shown beside the answer: streamed as a chunk's `STREAM_KEY`, listed under `LIST_KEY` when whole."""

    STREAM_KEY: ClassVar[str]
    LIST_KEY: ClassVar[str]

    def as_dict(self) -> dict[str, Any]:
        """The event as JSON-ready data."""
        ...
