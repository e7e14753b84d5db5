"""Aggregation strategies on Flower's functions: exact results, refusals, poisoning resistance, modes, central DP."""

from collections.abc import Callable
from functools import cache

import numpy as np
import numpy.typing as npt
import pytest

from federation.strategies import (
    STRATEGIES,
    AggregationError,
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    ServerSideGaussian,
    Strategy,
    Update,
    allowed_in_mode,
    make_strategy,
)
from federation.strategies.dp_wrapper import clip_l2

F32 = npt.NDArray[np.float32]


def vec(*values: float) -> F32:
    """A float32 vector from literal values."""
    return np.array(values, dtype=np.float32)


def updates_of(vectors: list[F32], weights: list[int] | None = None) -> list[Update]:
    """Updates from members m0, m1, ... with the given vectors (and weights, default 1)."""
    weights = weights or [1] * len(vectors)
    return [Update(f"m{i}", v, w) for i, (v, w) in enumerate(zip(vectors, weights, strict=True))]


# --- exact results on hand-computable inputs (expected values computed here with numpy, not Flower) ---


def test_fedavg_is_the_example_weighted_mean() -> None:
    vectors = [vec(1, 2, -4), vec(3, 6, 0), vec(5, -2, 8)]
    weights = [1, 3, 4]
    expected = (1 * vectors[0] + 3 * vectors[1] + 4 * vectors[2]) / 8  # = [3.75, 1.5, 3.5], exact in float32

    result = FedAvg().aggregate(updates_of(vectors, weights))

    np.testing.assert_array_equal(result.vector, expected)
    assert result.vector.dtype == np.float32
    assert result.members == ("m0", "m1", "m2") and result.strategy == "fedavg"


def test_fedmedian_takes_each_coordinates_median_ignoring_weights() -> None:
    vectors = [vec(1, 9, -3), vec(5, 2, 0), vec(2, 4, 100)]

    result = FedMedian().aggregate(updates_of(vectors, [100, 1, 1]))

    np.testing.assert_array_equal(result.vector, vec(2, 4, 0))
    assert result.strategy == "fedmedian"


def test_fedmedian_of_an_even_count_averages_the_two_middle_values() -> None:
    vectors = [vec(1, 8), vec(2, 6), vec(4, 2), vec(10, 0)]

    result = FedMedian().aggregate(updates_of(vectors))

    np.testing.assert_array_equal(result.vector, vec(3, 4))


def test_trimmed_avg_cuts_floor_beta_n_values_at_each_end() -> None:
    rng = np.random.default_rng(1)
    stacked = rng.normal(size=(5, 6)).astype(np.float32)
    expected = np.sort(stacked.astype(np.float64), axis=0)[1:4].mean(axis=0)  # ⌊0.2·5⌋ = 1 cut at each end

    result = FedTrimmedAvg(beta=0.2).aggregate(updates_of(list(stacked)))

    np.testing.assert_allclose(result.vector, expected, rtol=1e-6, atol=1e-7)
    assert result.strategy == "fedtrimmedavg"


def test_trimmed_avg_with_beta_zero_is_the_plain_mean() -> None:
    vectors = [vec(1, 2), vec(3, 4), vec(8, 0), vec(0, 2)]

    result = FedTrimmedAvg(beta=0.0).aggregate(updates_of(vectors, [5, 1, 1, 1]))

    np.testing.assert_array_equal(result.vector, vec(3, 2))


# Points on a line: x = 0, 1, 2, 4, 100. With n=5, f=1 each score sums the squared distances to the
# n−f−2 = 2 nearest others: 0 → 1+4 = 5, 1 → 1+1 = 2, 2 → 1+4 = 5, 4 → 4+9 = 13, 100 → 96²+98².
LINE = [vec(x, 0) for x in (0, 1, 2, 4, 100)]


def test_krum_returns_the_update_with_the_lowest_score_unchanged() -> None:
    result = Krum(f=1).aggregate(updates_of(LINE))

    np.testing.assert_array_equal(result.vector, vec(1, 0))
    assert result.members == ("m1",) and result.strategy == "krum"


def test_multi_krum_averages_the_m_best_weighted_by_examples() -> None:
    # The three lowest scores are x = 1 (2), 0 (5), 2 (5); weights 1, 1, 2 → (0 + 1 + 2·2) / 4 = 1.25.
    result = Krum(f=1, m=3).aggregate(updates_of(LINE, [1, 1, 2, 1, 1]))

    np.testing.assert_array_equal(result.vector, vec(1.25, 0))
    assert result.members == ("m0", "m1", "m2")


def reference_bulyan(stacked: npt.NDArray[np.float64], f: int) -> tuple[npt.NDArray[np.float64], list[int]]:
    """Bulyan written from the paper: n−2f picks by repeated Krum, then per coordinate the mean of the
    n−4f selected values closest to the median."""
    left = list(range(len(stacked)))
    picked: list[int] = []
    for _ in range(len(stacked) - 2 * f):
        pts = stacked[left]
        d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(axis=2)
        k = max(1, len(left) - f - 2)
        scores = np.sort(d2, axis=1)[:, 1 : k + 1].sum(axis=1)
        picked.append(left.pop(int(np.argmin(scores))))
    sel = stacked[picked]
    med = np.median(sel, axis=0)
    order = np.argsort(np.abs(sel - med), axis=0)[: len(stacked) - 4 * f]
    return np.take_along_axis(sel, order, axis=0).mean(axis=0), sorted(picked)


def test_bulyan_matches_a_reference_implementation() -> None:
    rng = np.random.default_rng(2)
    stacked = rng.normal(size=(7, 5)).astype(np.float32)
    stacked[3] += 50  # an outlier Krum never picks
    expected, picked = reference_bulyan(stacked.astype(np.float64), f=1)

    result = Bulyan(f=1).aggregate(updates_of(list(stacked)))

    np.testing.assert_allclose(result.vector, expected, rtol=1e-6, atol=1e-6)
    assert result.members == tuple(f"m{i}" for i in picked)
    assert "m3" not in result.members and len(result.members) == 5
    assert result.strategy == "bulyan"


# --- refusals ---


@pytest.mark.parametrize(
    ("strategy", "updates", "reason"),
    [
        (FedAvg(), [Update("a", vec(1, 2)), Update("b", vec(1, 2, 3))], "length 3 differs"),
        (FedMedian(), [Update("a", vec(1, np.nan)), Update("b", vec(1, 2))], "NaN or infinite"),
        (FedAvg(), [Update("a", vec(1, 2)), Update("b", vec(np.inf, 2))], "NaN or infinite"),
        (FedAvg(), [Update("a", vec(1, 2)), Update("a", vec(3, 4))], "duplicate member 'a'"),
        (FedAvg(), [Update("a", np.ones((2, 2), dtype=np.float32))], "must be 1-D"),
        (FedAvg(), [Update("a", np.ones(3, dtype=np.float64))], "must be float32"),
        (FedAvg(), [Update("a", vec())], "empty vector"),
        (FedAvg(), [], "at least 1 updates"),
        (Krum(f=1), updates_of([vec(i) for i in range(4)]), r"at least 5 updates \(n ≥ 2f\+3"),
        (Krum(f=1, m=5), updates_of([vec(i) for i in range(5)]), r"at least 6 updates"),
        (Bulyan(f=2), updates_of([vec(i) for i in range(7)]), r"at least 11 updates \(n ≥ 4f\+3\)"),
    ],
    ids=["length", "nan", "inf", "duplicate", "2-d", "float64", "empty", "none", "krum-f", "multikrum-m", "bulyan-f"],
)
def test_aggregate_refuses_with_the_reason(strategy: Strategy, updates: list[Update], reason: str) -> None:
    with pytest.raises(AggregationError, match=reason):
        strategy.aggregate(updates)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: FedTrimmedAvg(beta=0.5), r"beta must be in \[0, 0.5\)"),
        (lambda: FedTrimmedAvg(beta=-0.1), r"beta must be in \[0, 0.5\)"),
        (lambda: FedTrimmedAvg(beta=float("nan")), "beta must be a number"),
        (lambda: Krum(f=-1), "f .* must be an int ≥ 0"),
        (lambda: Krum(f=1, m=0), "m .* must be an int ≥ 1"),
        (lambda: Bulyan(f=True), "f .* must be an int ≥ 0"),
        (lambda: Update("a", vec(1), weight=0), "weight must be an int ≥ 1"),
        (lambda: Update("", vec(1)), "non-empty string"),
        (lambda: Update("a", [1.0, 2.0]), "numpy array"),  # type: ignore[arg-type]
        (lambda: ServerSideGaussian(FedAvg(), clip_norm=0, noise_multiplier=1), "clip_norm"),
        (lambda: ServerSideGaussian(FedAvg(), clip_norm=1, noise_multiplier=-1), "noise_multiplier"),
    ],
    ids=[
        "beta-half",
        "beta-negative",
        "beta-nan",
        "krum-f",
        "krum-m",
        "bulyan-bool",
        "weight",
        "member",
        "list",
        "clip",
        "noise",
    ],
)
def test_bad_parameters_are_refused(build: Callable[[], object], reason: str) -> None:
    with pytest.raises(AggregationError, match=reason):
        build()


# --- the declarative table and the privacy modes ---


def test_make_strategy_builds_each_table_entry_with_its_parameters() -> None:
    built = {
        "fedavg": make_strategy("fedavg"),
        "fedmedian": make_strategy("fedmedian"),
        "fedtrimmedavg": make_strategy("fedtrimmedavg", beta=0.3),
        "krum": make_strategy("krum", f=2, m=3),
        "bulyan": make_strategy("bulyan", f=1),
    }

    assert set(built) == set(STRATEGIES)
    assert {name: s.name for name, s in built.items()} == {name: name for name in STRATEGIES}
    assert [s.min_updates for s in built.values()] == [1, 1, 1, 7, 7]
    assert repr(built["fedtrimmedavg"]) == "FedTrimmedAvg(beta=0.3)" and repr(built["krum"]) == "Krum(f=2, m=3)"
    assert make_strategy("fedtrimmedavg").beta == 0.2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "params", "reason"),
    [
        ("fedprox", {}, "unknown strategy 'fedprox'; known: fedavg, fedmedian"),
        ("fedavg", {"beta": 0.1}, "unknown parameter.*beta; accepted: none"),
        ("krum", {"g": 1, "f": 1}, "unknown parameter.*g; accepted: f, m"),
        ("bulyan", {}, "missing required parameter 'f'"),
        ("krum", {"f": "2"}, "parameter 'f' must be int"),
        ("krum", {"f": True}, "parameter 'f' must be int"),
        ("krum", {"f": 1.0}, "parameter 'f' must be int"),
        ("fedtrimmedavg", {"beta": "0.1"}, "parameter 'beta' must be float"),
        ("fedtrimmedavg", {"beta": 0.7}, r"beta must be in \[0, 0.5\)"),
    ],
)
def test_make_strategy_refuses_unknown_names_and_bad_parameters(name: str, params: dict, reason: str) -> None:
    with pytest.raises(AggregationError, match=reason):
        make_strategy(name, **params)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_homomorphic_modes_allow_only_fedavg_and_dp_allows_all(name: str) -> None:
    assert allowed_in_mode(name, "he") is (name == "fedavg")
    assert allowed_in_mode(name, "he+dp") is (name == "fedavg")
    assert allowed_in_mode(name, "dp") is True


def test_allowed_in_mode_refuses_unknown_modes_and_names() -> None:
    with pytest.raises(AggregationError, match="unknown privacy mode 'tee'; known: dp, he, he\\+dp"):
        allowed_in_mode("fedavg", "tee")
    with pytest.raises(AggregationError, match="unknown strategy 'fedsgd'"):
        allowed_in_mode("fedsgd", "dp")


# --- poisoning: a few malicious members among honest ones ---

DIM = 10_000
SIGMA = 0.05  # honest spread around the common direction u ~ N(0, 1)^DIM, so ‖honest mean‖ ≈ ‖u‖ ≈ √DIM
# Every robust rule here returns, per coordinate, a value inside the range of the honest values: Krum returns one
# honest update, multi-Krum a mean of honest ones, median/trimmed mean/Bulyan order statistics that the attackers
# cannot push past the honest extremes (median: a < n/2; trimmed: ⌊beta·n⌋ ≥ a; Bulyan: n ≥ 4f+3). The range of
# h ≤ 6 samples of N(0, σ²) has an RMS below 2.7σ, so over 10,000 coordinates the relative distance concentrates
# below 2.7σ ≈ 0.135 in the worst case; 3σ = 0.15 is the bound. Measured: 0.00–0.05.
ROBUST_BOUND = 3 * SIGMA

SETTINGS = {"1of4": (4, 1), "2of7": (7, 2), "1of7": (7, 1)}  # (members n, malicious a)
ATTACKS = {"scale×100": 100.0, "flip×-1": -1.0, "flip×-10": -10.0}  # the attacker sends k · (its honest-like update)


@cache
def poisoned_round(setting: str, attack: str) -> tuple[tuple[Update, ...], npt.NDArray[np.float64]]:
    """The round's updates (the first a members malicious) and the honest members' mean."""
    n, a = SETTINGS[setting]
    rng = np.random.default_rng(7)
    u = rng.standard_normal(DIM)
    vectors = [(u + SIGMA * rng.standard_normal(DIM)).astype(np.float32) for _ in range(n)]
    honest_mean = np.mean(np.array(vectors[a:], dtype=np.float64), axis=0)
    for i in range(a):
        vectors[i] = (ATTACKS[attack] * vectors[i]).astype(np.float32)
    return tuple(updates_of(vectors)), honest_mean


def relative_distance(vector: F32, honest_mean: npt.NDArray[np.float64]) -> float:
    """‖aggregate − honest mean‖ / ‖honest mean‖."""
    return float(np.linalg.norm(vector - honest_mean) / np.linalg.norm(honest_mean))


def robust(name: str, n: int, a: int) -> tuple[str, dict[str, float]]:
    """The robust strategy `name` configured for a malicious members out of n, as (table name, params)."""
    table: dict[str, tuple[str, dict[str, float]]] = {
        "fedmedian": ("fedmedian", {}),
        "fedtrimmedavg": ("fedtrimmedavg", {"beta": (a + 0.5) / n}),  # ⌊beta·n⌋ = a values cut at each end
        "krum": ("krum", {"f": a}),
        "multikrum": ("krum", {"f": a, "m": n - a}),
        "bulyan": ("bulyan", {"f": a}),
    }
    return table[name]


def poisoning_cases() -> list[object]:
    """Every robust strategy × setting × attack whose assumption the setting meets (Krum needs n ≥ 2f+3, Bulyan
    n ≥ 4f+3); a setting that breaks one is not generated: the refusal of such a configuration is tested apart."""
    cases: list[object] = []
    for setting, (n, a) in SETTINGS.items():
        for attack in ATTACKS:
            for name in ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"):
                if name in ("krum", "multikrum") and n < 2 * a + 3:
                    continue
                if name == "bulyan" and n < 4 * a + 3:
                    continue
                cases.append(pytest.param(name, setting, attack, id=f"{name}-{setting}-{attack}"))
    return cases


@pytest.mark.parametrize(("name", "setting", "attack"), poisoning_cases())
def test_robust_strategy_stays_near_the_honest_mean(name: str, setting: str, attack: str) -> None:
    n, a = SETTINGS[setting]
    updates, honest_mean = poisoned_round(setting, attack)
    table_name, params = robust(name, n, a)
    strategy = make_strategy(table_name, **params)

    result = strategy.aggregate(updates)

    assert relative_distance(result.vector, honest_mean) < ROBUST_BOUND
    if name in ("krum", "multikrum", "bulyan"):  # the selecting rules never select an attacker
        assert not {f"m{i}" for i in range(a)} & set(result.members)


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fedavg_is_dragged_away_by_the_attackers(setting: str, attack: str) -> None:
    n, a = SETTINGS[setting]
    updates, honest_mean = poisoned_round(setting, attack)
    # mean − honest mean = (a/n)·(k·x_att − honest mean) ≈ (a/n)·(k − 1)·u, so the relative distance is ≈ |k−1|·a/n:
    # 24.8 to 28.3 for ×100, 1.6 to 3.1 for ×−10, and 0.29 to 0.57 for ×−1 (the mildest attack FedAvg can get).
    expected = abs(ATTACKS[attack] - 1) * a / n

    result = FedAvg().aggregate(updates)

    distance = relative_distance(result.vector, honest_mean)
    assert distance == pytest.approx(expected, rel=0.02)
    assert distance > ROBUST_BOUND
    if ATTACKS[attack] != -1.0:
        assert distance > 1


# --- central DP wrapper ---


def test_clip_l2_bounds_the_norm_and_leaves_small_updates_alone() -> None:
    big = np.random.default_rng(3).normal(size=1000).astype(np.float32) * 10
    small = vec(0.3, 0.4)  # norm 0.5

    clipped = clip_l2(big, 2.0)

    assert np.linalg.norm(clipped.astype(np.float64)) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(clipped / np.linalg.norm(clipped), big / np.linalg.norm(big), rtol=1e-5, atol=1e-7)
    assert clip_l2(small, 2.0) is small


def test_server_side_gaussian_clips_each_update_before_aggregating() -> None:
    updates = updates_of([vec(30, 40), vec(0.3, 0.4), vec(0, -6)])  # norms 50, 0.5, 6
    dp = ServerSideGaussian(FedAvg(), clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))

    result = dp.aggregate(updates)

    np.testing.assert_allclose(result.vector, (vec(0.6, 0.8) + vec(0.3, 0.4) + vec(0, -1)) / 3, rtol=1e-6)
    assert result.strategy == "fedavg+central-dp" and result.members == ("m0", "m1", "m2")
    assert dp.min_updates == 1


@pytest.mark.parametrize("n", [2, 8])
def test_server_side_gaussian_noise_std_is_z_c_over_n(n: int) -> None:
    dim, z, c = 200_000, 1.3, 2.0
    updates = updates_of([np.zeros(dim, dtype=np.float32) for _ in range(n)])
    dp = ServerSideGaussian(FedAvg(), clip_norm=c, noise_multiplier=z, rng=np.random.default_rng(4))

    noise = dp.aggregate(updates).vector.astype(np.float64)

    # The sample std of 200,000 Gaussian draws has a relative standard error of 1/√(2·200,000) ≈ 0.16%: 1% is ~6 SE.
    assert dp.noise_std(n) == z * c / n
    assert noise.std() == pytest.approx(z * c / n, rel=0.01)
    assert abs(noise.mean()) < 5 * (z * c / n) / np.sqrt(dim)
