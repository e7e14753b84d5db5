"""DP mechanisms (clip, Gaussian noise, distributed shares) and PRV accounting."""

import math

import numpy as np
import pytest

from crypto.dp import DPError, clip_l2, default_rng, epsilon, gaussian_noise, merge_history, privatize

DELTA = 1e-5


def test_clip_bounds_the_norm_and_keeps_the_direction() -> None:
    rng = np.random.default_rng(1)
    dtypes: list[type[np.floating]] = [np.float32, np.float64]
    for dtype in dtypes:
        vector: np.ndarray = rng.normal(0.0, 1.0, 100_000).astype(dtype)
        clipped, norm = clip_l2(vector, 1.0)
        assert norm == pytest.approx(float(np.linalg.norm(vector.astype(np.float64))))
        assert float(np.linalg.norm(clipped.astype(np.float64))) <= 1.0
        assert float(np.linalg.norm(clipped.astype(np.float64))) == pytest.approx(1.0, rel=1e-5)
        assert clipped.dtype == dtype
        np.testing.assert_allclose(clipped.astype(np.float64) * norm, vector.astype(np.float64), rtol=1e-4, atol=1e-6)


def test_clip_leaves_small_vectors_unchanged() -> None:
    vector = np.array([0.3, -0.4], dtype=np.float32)
    clipped, norm = clip_l2(vector, 1.0)
    assert norm == pytest.approx(0.5)
    np.testing.assert_array_equal(clipped, vector)
    assert clipped is not vector
    zero, zero_norm = clip_l2(np.zeros(3), 1.0)
    assert zero_norm == 0.0 and not zero.any()


def test_clip_refuses_bad_input() -> None:
    with pytest.raises(DPError, match="max_norm"):
        clip_l2(np.ones(3), 0.0)
    with pytest.raises(DPError, match="NaN"):
        clip_l2(np.array([1.0, np.inf]), 1.0)


def test_noise_std_matches() -> None:
    samples = gaussian_noise(400_000, 0.7, np.random.default_rng(2))
    assert samples.shape == (400_000,)
    assert abs(float(samples.mean())) < 0.01
    assert float(samples.std()) == pytest.approx(0.7, rel=0.01)
    assert not gaussian_noise((2, 3), 0.0, np.random.default_rng(2)).any()


def test_privatize_adds_z_times_c_noise_after_clipping() -> None:
    vector = np.full(200_000, 10.0, dtype=np.float32)  # norm far above C: clipped to C first
    clip, z = 2.0, 1.5
    noisy = privatize(vector, clip, z, np.random.default_rng(3))
    assert noisy.dtype == np.float32
    noise = noisy.astype(np.float64) - clip / math.sqrt(vector.size)
    assert float(noise.std()) == pytest.approx(z * clip, rel=0.01)
    assert privatize(vector, clip, z).shape == vector.shape  # default, secrets-seeded generator


def test_distributed_shares_sum_to_the_full_variance() -> None:
    members, clip, z = 5, 1.0, 1.2
    rng = np.random.default_rng(4)
    updates = [np.zeros(200_000, dtype=np.float64) for _ in range(members)]
    total = np.sum([privatize(u, clip, z, rng, share=1 / members) for u in updates], axis=0)
    one_share = privatize(updates[0], clip, z, rng, share=1 / members)
    assert float(total.var()) == pytest.approx((z * clip) ** 2, rel=0.02)
    assert float(one_share.var()) == pytest.approx((z * clip) ** 2 / members, rel=0.02)


def test_privatize_refuses_bad_parameters() -> None:
    with pytest.raises(DPError, match="share"):
        privatize(np.ones(3), 1.0, 1.0, share=1.5)
    with pytest.raises(DPError, match="noise_multiplier"):
        privatize(np.ones(3), 1.0, 0.0)


def test_default_rng_is_seeded_fresh() -> None:
    assert default_rng().integers(2**62) != default_rng().integers(2**62)


def test_epsilon_matches_known_values() -> None:
    assert epsilon([], DELTA) == 0.0
    assert epsilon([(1.0, 0.1, 100)], DELTA) == pytest.approx(7.1, abs=0.2)
    assert epsilon([(1.5, 0.1, 100)], DELTA) == pytest.approx(3.6, abs=0.2)


def test_composition_of_two_runs_equals_one_long_run() -> None:
    from opacus.accountants import PRVAccountant

    split = epsilon([(1.0, 0.1, 40), (1.0, 0.1, 60)], DELTA)
    raw = PRVAccountant()
    raw.history = [(1.0, 0.1, 100)]
    assert split == pytest.approx(raw.get_epsilon(delta=DELTA), rel=0.01)
    mixed = epsilon([(1.0, 0.1, 50), (2.0, 0.1, 50)], DELTA)
    assert epsilon([(2.0, 0.1, 50)], DELTA) < mixed < epsilon([(1.0, 0.1, 100)], DELTA)


def test_many_rounds_are_merged_before_accounting() -> None:
    assert merge_history([(1.0, 0.1, 1)] * 100 + [(2.0, 0.2, 3)]) == [(1.0, 0.1, 100), (2.0, 0.2, 3)]
    assert epsilon([(1.0, 0.1, 1)] * 100, DELTA) == pytest.approx(epsilon([(1.0, 0.1, 100)], DELTA))


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning")
def test_huge_epsilon_regimes_fall_back_to_rdp() -> None:
    eps = epsilon([(0.1, 0.5, 1000)], DELTA)  # PRV would need ~1e9 grid points here
    assert eps > 1000


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning")
@pytest.mark.parametrize("z", [0.03, 0.05])
def test_weak_noise_gives_rdps_finite_bound_where_prv_overflows(z: float) -> None:
    # Arrange: full-batch releases with weak noise, where PRV's grid overflows to inf
    from opacus.accountants import RDPAccountant

    rdp = RDPAccountant()
    rdp.history = [(z, 1.0, 4)]
    # Act
    eps = epsilon([(z, 1.0, 4)], DELTA)
    # Assert: a finite spend is never booked as infinite
    assert math.isfinite(eps) and eps == pytest.approx(rdp.get_epsilon(delta=DELTA))


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning")
@pytest.mark.parametrize("z", [0.01, 0.02])
def test_very_weak_noise_falls_back_to_rdp_where_prvs_discretization_fails(z: float) -> None:
    # Arrange: PRV raises RuntimeError ("Discrete mean differs significantly ...") for z <= 0.02
    from opacus.accountants import RDPAccountant

    rdp = RDPAccountant()
    rdp.history = [(z, 1.0, 1)]
    # Act
    eps = epsilon([(z, 1.0, 1)], DELTA)
    # Assert
    assert math.isfinite(eps) and eps == pytest.approx(rdp.get_epsilon(delta=DELTA))
    assert eps > epsilon([(0.03, 1.0, 1)], DELTA)


def test_epsilon_refuses_bad_history() -> None:
    with pytest.raises(DPError, match="delta"):
        epsilon([(1.0, 0.1, 1)], 0.0)
    with pytest.raises(DPError, match="entry 1: sample_rate"):
        epsilon([(1.0, 0.1, 1), (1.0, 1.5, 1)], DELTA)
    with pytest.raises(DPError, match="entry 0: noise_multiplier"):
        epsilon([(0.0, 0.1, 1)], DELTA)
    with pytest.raises(DPError, match="entry 0: steps"):
        epsilon([(1.0, 0.1, 1.5)], DELTA)  # type: ignore[list-item]
