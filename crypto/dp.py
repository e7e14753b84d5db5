"""Differential privacy for shared updates: L2 clipping, the Gaussian mechanism, and epsilon accounting.

`privatize` clips an update to L2 norm C and adds N(0, (z·C)²·share) per coordinate. With `share=1` one node
releases a privatized update on its own; with distributed noise each of n members adds `share=1/n` of the
variance, so that only the SUM (e.g. decrypted from an HE aggregate) carries the full (z·C)². A single share is
then NOT private on its own: it must stay hidden (HE or masking), and if members drop out or collude, the sum holds
less noise than accounted for.

Randomness: numpy's PCG64 (`np.random.default_rng`) seeded with 128 bits from `secrets` when no generator is
given; it is not torch's PRNG and not a cryptographically secure generator. Like most DP libraries, sampling uses
floating point, which leaks through the low-order bits in theory (Mironov 2012); acceptable for this threat model.

Accounting: opacus 1.6 `PRVAccountant` (Gopi et al. 2021), the upper bound of its ε estimate (eps_error 0.01).
A history is a list of (noise_multiplier z, sample_rate q, steps T), each T compositions of the Poisson-subsampled
Gaussian mechanism. Entries with equal (z, q) are merged before accounting (composition is commutative): opacus
convolves one PRV per entry, so 100 one-round entries took 17 s where the merged entry takes 0.2 s. When the PRV
grid would exceed MAX_PRV_GRID_POINTS (tiny z or q near 1: ε in the hundreds, and opacus would need GBs), the
looser but still valid RDP bound is returned instead. opacus (and torch) are imported on the first call (~2.5 s).
"""

import functools
import math
import secrets
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

EPS_ERROR = 0.01
MAX_PRV_GRID_POINTS = 4_000_000


class Spend(NamedTuple):
    """One accounting entry: `steps` compositions of the Gaussian mechanism with Poisson sampling."""

    noise_multiplier: float
    sample_rate: float
    steps: int


class DPError(ValueError):
    """Invalid parameters for a DP mechanism or for accounting; the message says which."""


def default_rng() -> np.random.Generator:
    """A numpy PCG64 generator seeded with 128 bits from `secrets` (not torch's PRNG)."""
    return np.random.default_rng(secrets.randbits(128))


def _float_array(vector: np.ndarray) -> np.ndarray:
    """`vector` as a finite float array (integers become float64)."""
    array = np.asarray(vector)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise DPError("the vector holds a NaN or infinite value")
    return array


def _check_positive(name: str, value: float) -> None:
    """Raise DPError unless `value` is a finite number > 0."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise DPError(f"{name} must be a finite number > 0, got {value!r}")


def clip_l2(vector: np.ndarray, max_norm: float) -> tuple[np.ndarray, float]:
    """Scale `vector` down to L2 norm <= max_norm (unchanged if already within); return (clipped, original norm)."""
    _check_positive("max_norm", max_norm)
    array = _float_array(vector)
    norm = float(np.linalg.norm(array.astype(np.float64, copy=False)))
    if norm <= max_norm:
        return array.copy(), norm
    clipped = (array.astype(np.float64) * (max_norm / norm)).astype(array.dtype)
    # Rounding (e.g. to float32) can leave the norm a hair above max_norm: shrink by a few ulps until it is not.
    tiny = float(np.finfo(array.dtype).eps)
    while float(np.linalg.norm(clipped.astype(np.float64))) > max_norm:
        clipped = (clipped.astype(np.float64) * (1.0 - 4.0 * tiny)).astype(array.dtype)
    return clipped, norm


def gaussian_noise(shape: int | tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """Float64 samples of N(0, std²) of `shape`, from `rng`."""
    if not (math.isfinite(std) and std >= 0):
        raise DPError(f"std must be a finite number >= 0, got {std!r}")
    return rng.normal(0.0, std, size=shape) if std > 0 else np.zeros(shape, dtype=np.float64)


def privatize(
    vector: np.ndarray,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
    share: float = 1.0,
) -> np.ndarray:
    """Clip to L2 norm C, add N(0, (z·C)²·share) per coordinate; same float dtype out (rng: secrets-seeded)."""
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("share", share)
    if share > 1:
        raise DPError(f"share is a fraction of the noise variance in (0, 1], got {share}")
    clipped, _ = clip_l2(vector, clip_norm)
    std = noise_multiplier * clip_norm * math.sqrt(share)
    noisy = clipped.astype(np.float64) + gaussian_noise(clipped.shape, std, rng or default_rng())
    return noisy.astype(clipped.dtype)


def _check_spend(index: int, spend: Sequence[float]) -> Spend:
    """Validate one history entry (z > 0, 0 < q <= 1, integer T >= 1)."""
    if len(spend) != 3:
        raise DPError(f"history entry {index}: expected (noise_multiplier, sample_rate, steps), got {spend!r}")
    z, q, steps = spend
    if not (isinstance(z, int | float) and math.isfinite(z) and z > 0):
        raise DPError(f"history entry {index}: noise_multiplier must be > 0, got {z!r}")
    if not (isinstance(q, int | float) and 0 < q <= 1):
        raise DPError(f"history entry {index}: sample_rate must be in (0, 1], got {q!r}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise DPError(f"history entry {index}: steps must be an integer >= 1, got {steps!r}")
    return Spend(float(z), float(q), int(steps))


def merge_history(history: Sequence[Sequence[float]]) -> list[Spend]:
    """Validate `history` and merge entries with equal (z, q) by adding their steps (first-seen order)."""
    merged: dict[tuple[float, float], int] = {}
    for index, spend in enumerate(history):
        z, q, steps = _check_spend(index, spend)
        merged[(z, q)] = merged.get((z, q), 0) + steps
    return [Spend(z, q, steps) for (z, q), steps in merged.items()]


class _GridTooLargeError(Exception):
    """The PRV discretization grid would exceed MAX_PRV_GRID_POINTS."""


@functools.cache
def _bounded_prv_accountant() -> type:
    """opacus' PRVAccountant that refuses, before allocating it, a grid larger than MAX_PRV_GRID_POINTS."""
    from opacus.accountants import PRVAccountant

    class BoundedPRVAccountant(PRVAccountant):
        def _get_domain(self, *args: Any, **kwargs: Any) -> Any:
            domain = super()._get_domain(*args, **kwargs)
            if domain.size > MAX_PRV_GRID_POINTS:
                raise _GridTooLargeError(domain.size)
            return domain

    return BoundedPRVAccountant


def epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε spent by the composition of `history` [(z, q, T)] at `delta` (opacus PRV upper bound); 0.0 if empty."""
    if not (isinstance(delta, float) and 0 < delta < 1):
        raise DPError(f"delta must be a float in (0, 1), got {delta!r}")
    merged = merge_history(history)
    return _epsilon_of_merged(tuple(merged), delta) if merged else 0.0


@functools.lru_cache(maxsize=256)
def _epsilon_of_merged(merged: tuple[Spend, ...], delta: float) -> float:
    """ε of a validated, merged history (cached: a budget check asks for the same history again and again)."""
    from opacus.accountants import RDPAccountant

    # opacus' PRV evaluates log(1 - q) and exp of large values: harmless -inf/overflow/nan warnings when q = 1.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        prv = _bounded_prv_accountant()()
        prv.history = list(merged)
        try:
            found = float(prv.get_epsilon(delta=delta, eps_error=EPS_ERROR))
        except (_GridTooLargeError, RuntimeError):  # RuntimeError: PRV's discretization check fails (z <= 0.02)
            found = math.nan
        if math.isfinite(found):
            return found
        # PRV's grid overflows for weak noise (small z, large ε): RDP still gives a finite, valid upper bound
        rdp = RDPAccountant()
        rdp.history = list(merged)
        return float(rdp.get_epsilon(delta=delta))
