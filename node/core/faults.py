"""Test-only fault injection: real faults the tests cannot cause otherwise (a native crash, a wrong answer).

A fault is armed by naming it in `MIRADOR_TEST_FAULT` (comma-separated). Nothing here runs unless a test sets that
variable; each hook says where it fires.
"""

import ctypes
import enum
import os
from typing import NoReturn

FAULT_ENV = "MIRADOR_TEST_FAULT"


class Fault(enum.Enum):
    """The faults a test can arm, by the value written in `MIRADOR_TEST_FAULT`."""

    PROBE_CRASH = "probe_crash"  # the extra-buffers probe child segfaults before decoding with extra buffers on
    PROBE_WRONG = "probe_wrong"  # the probe child reports wrong logits with extra buffers on
    PROBE_CRASH_ALL = "probe_crash_all"  # the probe child segfaults in both modes (llama.cpp cannot decode at all)
    DECODE_CRASH = "decode_crash"  # the daemon's decode thread segfaults on its first llama_decode


def armed(fault: Fault) -> bool:
    """True when a test armed `fault` in this process's environment."""
    raw = os.environ.get(FAULT_ENV, "")
    return fault.value in {part.strip() for part in raw.split(",")}


def disarm(fault: Fault) -> None:
    """Disarm `fault` in this process (and the children it starts from now on)."""
    raw = os.environ.get(FAULT_ENV, "")
    os.environ[FAULT_ENV] = ",".join(part for part in raw.split(",") if part.strip() and part.strip() != fault.value)


def crash_natively() -> NoReturn:
    """Die by a real SIGSEGV: read address 0 from C, as a broken native kernel would."""
    ctypes.string_at(0)
    raise AssertionError("reading address 0 did not crash")  # pragma: no cover
