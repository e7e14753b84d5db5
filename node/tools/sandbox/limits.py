"""The sandbox's vocabulary: its refusal, the limits of a run and how a run ended."""

from dataclasses import dataclass
from enum import StrEnum

from crypto.refusal import Refused


class SandboxReason(StrEnum):
    """Why untrusted code was not run."""

    UNAVAILABLE = "sandbox_unavailable"


class SandboxRefused(Refused):
    """The sandbox cannot start here: the detail says why and what to do."""

    REASONS = SandboxReason


@dataclass(frozen=True)
class Limits:
    """What one run may use (defaults: a tool call)."""

    cpu_s: int = 10  # CPU seconds of each process: SIGXCPU, and SIGKILL a second later
    wall_s: float = 20.0  # the whole run, bwrap's start included
    memory_mb: int = 1024  # address space of each process (`import sympy` needs about 200 MB)
    processes: int = 32  # processes and threads of the code's uid in the sandbox (bwrap's pid 1 too, unless root)
    file_mb: int = 16  # each file written; /tmp holds 4x that in all
    output_bytes: int = 65536  # stdout and stderr, each

    def __post_init__(self) -> None:
        if min(self.cpu_s, self.wall_s, self.memory_mb, self.processes, self.file_mb, self.output_bytes) <= 0:
            raise ValueError(f"sandbox limits must be positive: {self}")


@dataclass(frozen=True)
class Outcome:
    """How a run ended and what it printed."""

    stdout: str  # utf-8 with errors replaced, at most limits.output_bytes bytes of it
    stderr: str
    exit_code: int | None  # None when killed by a signal
    ended: str  # exit | wall_time | cpu_time | signal | output_limit
    truncated: bool  # the output went past the cap (and the run was killed there)
    wall_s: float

    def ok(self) -> bool:
        """The code ran to its end and exited with 0."""
        return self.ended == "exit" and self.exit_code == 0
