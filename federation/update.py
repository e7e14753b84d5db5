"""The LoRA update format: a fixed layout of named float32 tensors, flattened to one vector, sent as safetensors.

The descriptor's adapter config (rank, targets) does not give the base model's dimensions, so a federation's
`Layout` is taken from the tensors of its first global adapter (`Layout.of`): names sorted, with their shapes.
Its `digest()` goes into every update header, so a member training a different shape is refused before its payload
is even read. On the wire a plain update is the safetensors encoding of its tensors (never pickle); decoding checks
the size, then reads the header itself (its length fits the layout, it names no foreign tensor) before safetensors
builds any array, then checks names, shapes, dtype and finiteness.
"""

import hashlib
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum

import msgspec
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from crypto.refusal import Refused

LAYOUT_SCHEMA = "mirador.layout/v1"
DTYPE = np.dtype("<f4")
MAX_TENSORS = 4096
MAX_NAME_CHARS = 256
_LISTED = 5  # names listed in an error message before "…"


class UpdateReason(StrEnum):
    """What is wrong with an update's tensors."""

    MALFORMED = "malformed"
    WRONG_SHAPE = "wrong_shape"
    NON_FINITE = "non_finite"
    OVERSIZED = "oversized"


class UpdateError(Refused):
    """Tensors that do not fit the layout, or bytes that are not an acceptable update: `reason` and a detail."""

    REASONS = UpdateReason
    reason: UpdateReason


def _listed(names: set[str]) -> str:
    shown = sorted(names)[:_LISTED]
    return ", ".join(shown) + (f", … ({len(names)} in all)" if len(names) > _LISTED else "")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or name == "__metadata__":
        raise UpdateError(UpdateReason.MALFORMED, f"bad tensor name {str(name)[:MAX_NAME_CHARS]!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UpdateError(UpdateReason.MALFORMED, f"tensor name {name!r} has control characters")
    return name


@dataclass(frozen=True)
class Layout:
    """The ordered (name, shape) list of an adapter's tensors; updates are float32 vectors of `size` values."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise UpdateError(UpdateReason.MALFORMED, "a layout needs at least one tensor")
        if len(self.entries) > MAX_TENSORS:
            raise UpdateError(UpdateReason.MALFORMED, f"{len(self.entries)} tensors; the limit is {MAX_TENSORS}")
        names = [_check_name(name) for name, _ in self.entries]
        if names != sorted(set(names)):
            raise UpdateError(UpdateReason.MALFORMED, "layout names must be sorted and unique")
        for name, shape in self.entries:
            if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
                raise UpdateError(UpdateReason.MALFORMED, f"tensor {name!r}: bad shape {shape}")

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray]) -> "Layout":
        """The layout of `tensors` (names sorted; the dtype is not recorded: updates are always float32)."""
        return cls(tuple((name, tuple(int(d) for d in tensors[name].shape)) for name in sorted(tensors)))

    @property
    def names(self) -> tuple[str, ...]:
        """The tensor names, sorted."""
        return tuple(name for name, _ in self.entries)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape}."""
        return dict(self.entries)

    @property
    def size(self) -> int:
        """The number of float32 values in a flattened update."""
        return sum(math.prod(shape) for _, shape in self.entries)

    def digest(self) -> str:
        """Hex sha256 of the canonical description (schema, dtype, names and shapes): what headers carry."""
        body = {"schema": LAYOUT_SCHEMA, "dtype": "F32", "tensors": [[n, list(s)] for n, s in self.entries]}
        return hashlib.sha256(msgspec.json.encode(body)).hexdigest()


def check_tensors(tensors: Mapping[str, np.ndarray], layout: Layout) -> None:
    """Raise UpdateError(WRONG_SHAPE) naming the first mismatch: missing/extra names, shape, dtype, not an array."""
    present, expected = set(tensors), set(layout.names)
    if missing := expected - present:
        raise UpdateError(UpdateReason.WRONG_SHAPE, f"missing tensors: {_listed(missing)}")
    if extra := present - expected:
        raise UpdateError(UpdateReason.WRONG_SHAPE, f"unexpected tensors: {_listed({str(n) for n in extra})}")
    for name, shape in layout.entries:
        array = tensors[name]
        if not isinstance(array, np.ndarray):
            raise UpdateError(UpdateReason.WRONG_SHAPE, f"tensor {name!r} is a {type(array).__name__}, not an array")
        if array.shape != shape:
            raise UpdateError(UpdateReason.WRONG_SHAPE, f"tensor {name!r} has shape {array.shape}, expected {shape}")
        if array.dtype != DTYPE:
            raise UpdateError(UpdateReason.WRONG_SHAPE, f"tensor {name!r} is {array.dtype}, expected float32")


def check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    """Raise UpdateError(NON_FINITE) naming the first tensor (in name order) holding NaN or ±inf."""
    for name in sorted(tensors):
        array = tensors[name]
        if not np.isfinite(array).all():
            nans, infs = int(np.isnan(array).sum()), int(np.isinf(array).sum())
            raise UpdateError(UpdateReason.NON_FINITE, f"tensor {name!r} holds {nans} NaN and {infs} infinite values")


def flatten(tensors: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    """One float32 vector of the tensors in layout order; UpdateError if they do not match the layout exactly."""
    check_tensors(tensors, layout)
    return np.concatenate([tensors[name].reshape(-1) for name in layout.names]).astype(DTYPE, copy=False)


def unflatten(vector: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """The tensors of a flattened update (a copy, split in layout order); UpdateError on a wrong size or dtype."""
    if not isinstance(vector, np.ndarray) or vector.ndim != 1:
        raise UpdateError(UpdateReason.WRONG_SHAPE, "an update vector is a one-dimensional array")
    if vector.dtype != DTYPE:
        raise UpdateError(UpdateReason.WRONG_SHAPE, f"the update vector is {vector.dtype}, expected float32")
    if vector.size != layout.size:
        detail = f"the update vector has {vector.size} values, expected {layout.size}"
        raise UpdateError(UpdateReason.WRONG_SHAPE, detail)
    data = vector.copy()
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in layout.entries:
        count = math.prod(shape)
        out[name] = data[offset : offset + count].reshape(shape)
        offset += count
    return out


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The safetensors bytes of float32, finite tensors (what a plain update payload is)."""
    for name, array in tensors.items():
        _check_name(name)
        if not isinstance(array, np.ndarray) or array.dtype != DTYPE:
            raise UpdateError(UpdateReason.WRONG_SHAPE, f"tensor {name!r} is not a float32 array")
    check_finite(tensors)
    return safetensors.numpy.save({name: np.ascontiguousarray(array) for name, array in tensors.items()})


# A safetensors header entry is the name and ~100 bytes of dtype, shape and offsets: this bounds the JSON per name
HEADER_BYTES_PER_TENSOR = MAX_NAME_CHARS + 256


def load_payload(data: bytes, max_bytes: int, names: Collection[str]) -> dict[str, np.ndarray]:
    """The arrays of a safetensors payload of at most `max_bytes`, whose header names no tensor outside `names`
    (both checked before safetensors builds any array: a header of a million empty tensors would cost gigabytes);
    nothing else checked."""
    if len(data) > max_bytes:
        raise UpdateError(UpdateReason.OVERSIZED, f"the payload is {len(data)} bytes; the limit is {max_bytes}")
    header_limit = 1024 + HEADER_BYTES_PER_TENSOR * len(names)
    header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < header_len <= min(header_limit, len(data) - 8):
        detail = f"a header of {header_len} bytes (at most {header_limit} for {len(names)} tensors)"
        raise UpdateError(UpdateReason.MALFORMED, f"not a safetensors payload: {detail}")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (ValueError, RecursionError) as exc:  # RecursionError: a header of nested brackets
        raise UpdateError(UpdateReason.MALFORMED, f"not a safetensors payload: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise UpdateError(UpdateReason.MALFORMED, "not a safetensors payload: the header is not an object")
    if extra := set(header) - {"__metadata__"} - set(names):
        raise UpdateError(UpdateReason.WRONG_SHAPE, f"unexpected tensors: {_listed({str(n) for n in extra})}")
    try:
        return safetensors.numpy.load(bytes(data))
    except (SafetensorError, ValueError, TypeError, KeyError) as exc:
        raise UpdateError(UpdateReason.MALFORMED, f"not a safetensors payload: {exc}") from None


def decode_tensors(data: bytes, layout: Layout, max_bytes: int) -> dict[str, np.ndarray]:
    """Parse a safetensors payload and check it against `layout` (size first, then names, shapes, dtype, finiteness)."""
    tensors = load_payload(data, max_bytes, layout.names)
    check_tensors(tensors, layout)
    check_finite(tensors)
    return tensors
