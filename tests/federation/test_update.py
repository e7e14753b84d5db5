"""The LoRA update format: layouts, flatten/unflatten, safetensors payloads; every malformed case is refused."""

import enum
import json
import re
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from federation.privacy import MAX_PLAIN_BYTES
from federation.update import (
    Layout,
    UpdateError,
    UpdateReason,
    decode_tensors,
    encode_tensors,
    flatten,
    unflatten,
)

LIMIT = 1 << 20


def adapter(seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny two-module LoRA (rank 2), float32."""
    rng = np.random.default_rng(seed)
    return {
        "layers.0.q_proj.lora_B.weight": rng.standard_normal((6, 2)).astype(np.float32),
        "layers.0.q_proj.lora_A.weight": rng.standard_normal((2, 5)).astype(np.float32),
        "layers.0.v_proj.lora_A.weight": rng.standard_normal((2, 5)).astype(np.float32),
        "layers.0.v_proj.lora_B.weight": rng.standard_normal((3, 2)).astype(np.float32),
    }


@pytest.fixture
def layout() -> Layout:
    return Layout.of(adapter())


def test_layout_sorts_names_and_counts_values(layout: Layout) -> None:
    assert list(layout.names) == sorted(adapter())
    assert layout.size == 6 * 2 + 2 * 5 + 2 * 5 + 3 * 2
    assert layout.shapes["layers.0.v_proj.lora_B.weight"] == (3, 2)


def test_layout_digest_is_stable_and_depends_on_names_and_shapes(layout: Layout) -> None:
    assert layout.digest() == Layout.of(dict(reversed(adapter().items()))).digest()
    reshaped = adapter() | {"layers.0.v_proj.lora_B.weight": np.zeros((2, 3), np.float32)}
    renamed = {k.replace("v_proj", "k_proj"): v for k, v in adapter().items()}
    assert len({layout.digest(), Layout.of(reshaped).digest(), Layout.of(renamed).digest()}) == 3


@pytest.mark.parametrize(
    "entries",
    [(), (("b", (1,)), ("a", (1,))), (("a", (1,)), ("a", (1,))), (("a", (0, 2)),), (("a", ()),), (("", (1,)),)],
    ids=["empty", "unsorted", "duplicate", "zero-dim", "scalar", "no-name"],
)
def test_a_bad_layout_is_refused(entries: tuple[tuple[str, tuple[int, ...]], ...]) -> None:
    with pytest.raises(UpdateError):
        Layout(entries)


def test_flatten_unflatten_round_trip(layout: Layout) -> None:
    tensors = adapter()
    vector = flatten(tensors, layout)
    assert vector.dtype == np.float32 and vector.shape == (layout.size,)
    back = unflatten(vector, layout)
    assert list(back) == list(layout.names)
    for name, array in tensors.items():
        np.testing.assert_array_equal(back[name], array)
    vector[:] = 0  # the result does not share memory with the vector it came from
    assert back[layout.names[0]].any()


class Bad(enum.Enum):
    """Ways a set of tensors can fail to fit the layout."""

    MISSING = enum.auto()
    EXTRA = enum.auto()
    WRONG_SHAPE = enum.auto()
    WRONG_DTYPE = enum.auto()
    NOT_AN_ARRAY = enum.auto()


def bad_tensors(bad: Bad) -> tuple[dict[str, np.ndarray], str]:
    """Tensors with one fault, and a word the error must contain."""
    tensors = adapter()
    name = "layers.0.q_proj.lora_A.weight"
    if bad is Bad.MISSING:
        del tensors[name]
        return tensors, "missing tensors: layers.0.q_proj.lora_A.weight"
    if bad is Bad.EXTRA:
        tensors["layers.0.o_proj.lora_A.weight"] = np.zeros((2, 5), np.float32)
        return tensors, "unexpected tensors: layers.0.o_proj"
    if bad is Bad.WRONG_SHAPE:
        tensors[name] = np.zeros((5, 2), np.float32)
        return tensors, re.escape(f"{name!r} has shape (5, 2)")
    if bad is Bad.WRONG_DTYPE:
        tensors[name] = tensors[name].astype(np.float16)
        return tensors, "float16"
    tensors[name] = tensors[name].tolist()
    return tensors, "not an array"


@pytest.mark.parametrize("bad", list(Bad), ids=lambda b: b.name.lower())
def test_flatten_refuses_tensors_that_do_not_fit(layout: Layout, bad: Bad) -> None:
    tensors, words = bad_tensors(bad)
    with pytest.raises(UpdateError, match=words) as info:
        flatten(tensors, layout)
    assert info.value.reason is UpdateReason.WRONG_SHAPE


@pytest.mark.parametrize(
    "vector",
    [np.zeros(37, np.float32), np.zeros(39, np.float32), np.zeros(38, np.float64), np.zeros((2, 19), np.float32)],
    ids=["short", "long", "float64", "2-d"],
)
def test_unflatten_refuses_a_vector_of_the_wrong_size_or_dtype(layout: Layout, vector: np.ndarray) -> None:
    assert layout.size == 38
    with pytest.raises(UpdateError) as info:
        unflatten(vector, layout)
    assert info.value.reason is UpdateReason.WRONG_SHAPE


def test_safetensors_round_trip(layout: Layout) -> None:
    tensors = adapter(3)
    data = encode_tensors(tensors)
    (header_len,) = struct.unpack("<Q", data[:8])
    assert json.loads(data[8 : 8 + header_len])  # a safetensors header, not a pickle
    back = decode_tensors(data, layout, LIMIT)
    assert sorted(back) == sorted(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(back[name], array)


def test_encode_refuses_non_float32_or_non_finite() -> None:
    with pytest.raises(UpdateError):
        encode_tensors({"a": np.zeros(2, np.float64)})
    with pytest.raises(UpdateError, match="'a' holds 1 NaN"):
        encode_tensors({"a": np.array([0, np.nan], np.float32)})


class Malformed(enum.Enum):
    """Ways a payload can be refused by `decode_tensors`."""

    OVERSIZED = enum.auto()
    GARBAGE = enum.auto()
    TRUNCATED = enum.auto()
    EMPTY = enum.auto()
    BAD_HEADER_JSON = enum.auto()
    UNKNOWN_DTYPE = enum.auto()
    MISSING_TENSOR = enum.auto()
    EXTRA_TENSOR = enum.auto()
    WRONG_SHAPE = enum.auto()
    FLOAT16 = enum.auto()
    FLOAT64 = enum.auto()
    NAN = enum.auto()
    INF = enum.auto()


def raw_safetensors(header: dict[str, Any], body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


def malformed_payload(fault: Malformed) -> tuple[bytes, UpdateReason, str]:
    """A payload with `fault`, the reason expected and words the detail must contain."""
    good = encode_tensors(adapter())
    name = "layers.0.v_proj.lora_B.weight"
    tensors = adapter()
    match fault:
        case Malformed.OVERSIZED:
            return good + b"\0" * LIMIT, UpdateReason.OVERSIZED, "limit"
        case Malformed.GARBAGE:
            return b"\x80\x04\x95 not safetensors (nor pickle)", UpdateReason.MALFORMED, "not a safetensors"
        case Malformed.TRUNCATED:
            return good[:-3], UpdateReason.MALFORMED, "not a safetensors"
        case Malformed.EMPTY:
            return b"", UpdateReason.MALFORMED, "not a safetensors"
        case Malformed.BAD_HEADER_JSON:
            return struct.pack("<Q", 5) + b"{oops", UpdateReason.MALFORMED, "not a safetensors"
        case Malformed.UNKNOWN_DTYPE:
            header = {name: {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}
            return raw_safetensors(header, b"\0\0"), UpdateReason.MALFORMED, "not a safetensors"
        case Malformed.MISSING_TENSOR:
            del tensors[name]
        case Malformed.EXTRA_TENSOR:
            tensors["layers.1.q_proj.lora_A.weight"] = np.zeros((2, 5), np.float32)
        case Malformed.WRONG_SHAPE:
            tensors[name] = np.zeros((2, 3), np.float32)
        case Malformed.FLOAT16:
            tensors[name] = tensors[name].astype(np.float16)
        case Malformed.FLOAT64:
            tensors[name] = tensors[name].astype(np.float64)
        case Malformed.NAN | Malformed.INF:
            tensors[name][1, 1] = np.nan if fault is Malformed.NAN else -np.inf
            return safetensors.numpy.save(tensors), UpdateReason.NON_FINITE, name
    return safetensors.numpy.save(tensors), UpdateReason.WRONG_SHAPE, "layers."


def test_a_header_of_a_million_empty_tensors_is_refused_before_any_array_is_built(layout: Layout) -> None:
    # Arrange: well under the size limit, a header listing 200,000 zero-size tensors (safetensors would build an
    # array for each: ~400 MB and seconds before any name is checked)
    entries = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(200_000)}
    bomb = raw_safetensors(entries, b"")
    small = raw_safetensors({"t0": entries["t0"], "t1": entries["t1"]}, b"")
    # Act
    tracemalloc.start()
    with pytest.raises(UpdateError, match="header of") as big_header:
        decode_tensors(bomb, layout, MAX_PLAIN_BYTES)
    with pytest.raises(UpdateError, match="unexpected tensors") as foreign:
        decode_tensors(small, layout, LIMIT)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Assert: refused from the header alone, with almost nothing allocated
    assert big_header.value.reason is UpdateReason.MALFORMED and foreign.value.reason is UpdateReason.WRONG_SHAPE
    assert peak < 2 * 2**20, peak


def test_a_header_of_nested_brackets_is_refused_as_malformed(layout: Layout) -> None:
    # Arrange: within the header's length limit, deeper than Python's JSON parser recurses
    nested = b"[" * 1500
    # Act / Assert
    with pytest.raises(UpdateError) as refused:
        decode_tensors(struct.pack("<Q", len(nested)) + nested, layout, LIMIT)
    assert refused.value.reason is UpdateReason.MALFORMED


@pytest.mark.parametrize("fault", list(Malformed), ids=lambda f: f.name.lower())
def test_decode_refuses_every_malformed_payload(layout: Layout, fault: Malformed) -> None:
    data, reason, words = malformed_payload(fault)
    with pytest.raises(UpdateError, match=words) as info:
        decode_tensors(data, layout, LIMIT)
    assert info.value.reason is reason
