"""8-bit updates: each tensor of a plain update as int8 codes times one float32 scale (roadmap §11).

A federation whose descriptor says `update_encoding = "q8"` sends its members' plain updates this way: a quarter of
the float32 bytes. Per tensor the scale is max|x| / 127 and every value is rounded stochastically to a code in
[−127, 127] (down or up with the probabilities that make the expected code x / scale exactly), so the mean of many
members' quantized updates is an unbiased estimate of the mean of their float32 updates: rounding errors average
out instead of adding up as a bias (Alistarh et al. 2017, QSGD, https://arxiv.org/abs/1610.02132). Quantizing a
released update is post-processing: it changes no DP guarantee. Aggregates stay float32 (one per round, and the
global adapter accumulates them).

On the wire it is safetensors (never pickle): the layout's tensors as int8 under their own names, plus the scales,
one per tensor in layout order, as the float32 tensor `SCALES`. Decoding checks the size before parsing, then names,
shapes, dtypes, codes and scales, and returns the float32 values.
"""

from collections.abc import Mapping

import numpy as np
import safetensors.numpy

from federation.update import DTYPE, Layout, UpdateError, UpdateReason, check_finite, check_tensors, load_payload

SCALES = "mirador.q8.scales"  # not a peft tensor name: they all start with "base_model."
CODE = np.dtype("i1")
LEVELS = 127  # codes are symmetric: −128 is never produced and refused when received


def quantize(tensors: Mapping[str, np.ndarray], layout: Layout, rng: np.random.Generator) -> bytes:
    """The q8 payload of float32, finite `tensors` of `layout`, rounded stochastically with `rng`."""
    check_tensors(tensors, layout)
    check_finite(tensors)
    if SCALES in layout.names:
        raise UpdateError(UpdateReason.MALFORMED, f"{SCALES!r} is reserved for the scales of a q8 update")
    out: dict[str, np.ndarray] = {}
    scales = np.zeros(len(layout.entries), dtype=DTYPE)
    for i, name in enumerate(layout.names):
        values = tensors[name].astype(np.float64)
        peak = float(np.max(np.abs(values)))
        if peak == 0.0:
            out[name] = np.zeros(values.shape, dtype=CODE)
            continue
        scale = np.float32(peak / LEVELS)
        scaled = values / float(scale)  # |scaled| <= 127 up to the float32 rounding of the scale
        codes = np.floor(scaled + rng.random(values.shape))
        out[name] = np.clip(codes, -LEVELS, LEVELS).astype(CODE)
        scales[i] = scale
    out[SCALES] = scales
    return safetensors.numpy.save(out)


def dequantize(data: bytes, layout: Layout, max_bytes: int) -> dict[str, np.ndarray]:
    """The float32 tensors of a q8 payload (size first, then names, shapes, dtypes, codes, scales, finiteness)."""
    loaded = load_payload(data, max_bytes, (*layout.names, SCALES))
    scales = loaded.pop(SCALES, None)
    count = len(layout.entries)
    if not isinstance(scales, np.ndarray) or scales.dtype != DTYPE or scales.shape != (count,):
        raise UpdateError(UpdateReason.MALFORMED, f"a q8 update carries {count} float32 scales as {SCALES!r}")
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise UpdateError(UpdateReason.MALFORMED, "a q8 update's scales must be finite and not negative")
    check_tensors({name: _as_float_shape(codes) for name, codes in loaded.items()}, layout)
    out: dict[str, np.ndarray] = {}
    for name, scale in zip(layout.names, scales, strict=True):
        codes = loaded[name]
        if codes.dtype != CODE:
            raise UpdateError(UpdateReason.WRONG_SHAPE, f"tensor {name!r} is {codes.dtype}, expected int8 codes")
        if (codes < -LEVELS).any():
            raise UpdateError(UpdateReason.MALFORMED, f"tensor {name!r} holds the code -128 (codes are ±{LEVELS})")
        with np.errstate(over="ignore"):  # a hostile scale near float32's max: inf, refused just below
            out[name] = codes.astype(DTYPE) * scale
    check_finite(out)
    return out


def _as_float_shape(array: np.ndarray) -> np.ndarray:
    """A zero-size float32 stand-in with `array`'s shape, so `check_tensors` checks names and shapes only."""
    return np.broadcast_to(np.zeros((), dtype=DTYPE), array.shape)
