"""One refusal vocabulary: every protocol and verifier refuses hostile or invalid input by raising a `Refused` (or
a subclass) that carries a machine-readable `reason` (a short snake_case code, stable across releases: logged,
counted, sent back to peers) and a human `detail` (what exactly is wrong). Verification failures are
`VerificationError`s (sigstore-python 3.x style: an exception hierarchy instead of result objects)."""

from enum import StrEnum
from typing import ClassVar


class Refused(ValueError):
    """Input refused: `reason` (a code) and `detail` (words). `str()` is 'reason: detail'.

    A subclass with a closed set of codes names its StrEnum in `REASONS`; its reasons are then members of it (a code
    outside it is a programming error: ValueError)."""

    REASONS: ClassVar[type[StrEnum] | None] = None

    def __init__(self, reason: str, detail: str) -> None:
        if self.REASONS is not None:
            reason = self.REASONS(reason)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SingleReason(Refused):
    """A refusal class with one reason, `REASON`: raised with the detail alone."""

    REASON: ClassVar[str] = "refused"

    def __init__(self, detail: str) -> None:
        super().__init__(self.REASON, detail)


class VerificationError(Refused):
    """A signature, envelope, statement, trust or file check that failed."""


class StructReason(StrEnum):
    """Why bytes are not a signed struct at all (shared by every strict decoder)."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    SCHEMA = "schema"
