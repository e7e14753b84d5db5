"""Member releases, blind aggregation and application of the aggregate in each privacy mode (real CKKS ciphertexts)."""

import numpy as np
import pytest

from crypto.dp import Spend, epsilon
from crypto.he import HEKeyError, SecretContext
from crypto.identity import Identity
from federation.descriptor import (
    AdapterConfig,
    DpParams,
    FederationDescriptor,
    HeParams,
    Privacy,
    StrategySpec,
    sign_descriptor,
    verify_descriptor,
)
from federation.privacy import (
    PrivacyError,
    apply_update,
    check_user_level,
    combine,
    delta_of,
    mean_update,
    members_needed,
    noise_std_of_sum,
    noise_to_update,
    release,
    round_spend,
    update_layout,
)
from federation.update import Layout, encode_tensors

SHAPES = {"layers.0.q_proj.lora_A.weight": (4, 96), "layers.0.q_proj.lora_B.weight": (96, 4)}


def descriptor(
    mode: str,
    noise: float = 0.0,
    clip: float = 100.0,
    strategy: str = "fedavg",
    quorum: int = 3,
    freeze_a: bool = False,
) -> FederationDescriptor:
    privacy = Privacy(
        mode=mode,  # type: ignore[arg-type]
        dp=DpParams(clip_norm=clip, noise_multiplier=noise),
        he=HeParams() if "he" in mode else None,
    )
    signed = sign_descriptor(
        Identity.generate(),
        name="fed-test",
        base_sha256="ab" * 32,
        adapter=AdapterConfig(rank=4, alpha=8.0, targets=("q_proj",), freeze_a=freeze_a),
        privacy=privacy,
        strategy=StrategySpec(name=strategy),
        quorum=quorum,
        min_members=4,
    )
    return verify_descriptor(signed)


def deltas(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


def test_he_aggregate_equals_plaintext_fedavg_and_the_aggregator_cannot_decrypt() -> None:
    # Arrange: 4 members, the creator's secret context, the aggregator's public one
    fed = descriptor("he")
    secret = SecretContext.generate()
    public = secret.public()
    updates = deltas(4)
    layout = Layout.of(updates[0])
    # Act
    released = [release(d, layout, fed, public) for d in updates]
    combined = combine([(f"m{i}", r.payload) for i, r in enumerate(released)], layout, fed, public)
    mean = mean_update(combined.kind, combined.payload, combined.count, layout, secret)
    # Assert
    assert {r.kind for r in released} == {"ckks"} and {r.spend for r in released} == {None}
    assert combined.kind == "ckks" and combined.count == 4 and combined.contributors == ["m0", "m1", "m2", "m3"]
    for name in SHAPES:
        plain = np.mean([d[name] for d in updates], axis=0)
        np.testing.assert_allclose(mean[name], plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    with pytest.raises((PrivacyError, HEKeyError)):
        mean_update(combined.kind, combined.payload, combined.count, layout, public)  # type: ignore[arg-type]
    assert not public.has_secret_key


def test_dp_user_release_is_clipped_and_noised_with_std_z_times_c() -> None:
    # Arrange: an update far larger than C
    fed = descriptor("dp-user", noise=0.5, clip=1.0)
    big = {k: np.full(s, 3.0, np.float32) for k, s in SHAPES.items()}
    layout = Layout.of(big)
    # Act
    out = release(big, layout, fed, rng=np.random.default_rng(1))
    combined = combine([("m0", out.payload), ("m1", out.payload)], layout, fed)
    mean = mean_update(combined.kind, combined.payload, combined.count, layout)
    vector = np.concatenate([mean[k].ravel() for k in sorted(SHAPES)])
    # Assert: the clipped signal has norm 1 spread over every coordinate; what is left is noise of std z·C
    signal = np.full(vector.size, 1.0 / np.sqrt(vector.size))
    assert out.kind == "plain" and out.spend == round_spend(fed) and out.spend == (0.5, 1.0, 1)
    assert np.std(vector - signal) == pytest.approx(0.5, rel=0.05)


def test_he_dp_user_members_add_a_quorum_share_of_the_noise() -> None:
    # Arrange: zero updates, so the decrypted sum is pure noise; 32,768 coordinates put the std's sampling error at
    # 0.4 % (768 left it at 2.6 %, and one CI run in ~50 drew -6.8 %), and seeded draws make the test deterministic
    fed = descriptor("he+dp-user", noise=1.0, clip=1.0)
    secret = SecretContext.generate()
    shapes = {"layers.0.q_proj.lora_A.weight": (16, 1024), "layers.0.q_proj.lora_B.weight": (1024, 16)}
    zeros = [{k: np.zeros(s, np.float32) for k, s in shapes.items()} for _ in range(4)]
    layout = Layout.of(zeros[0])
    # Act
    released = [release(z, layout, fed, secret.public(), rng=np.random.default_rng(i)) for i, z in enumerate(zeros)]
    combined = combine([(f"m{i}", r.payload) for i, r in enumerate(released)], layout, fed, secret.public())
    mean = mean_update(combined.kind, combined.payload, combined.count, layout, secret)
    total = np.concatenate([mean[k].ravel() for k in sorted(shapes)]) * combined.count
    # Assert: the sum's noise is z·C·sqrt(4/3) (each of 4 adds 1/quorum of the variance), not z·C (one share)
    assert np.std(total) == pytest.approx(noise_std_of_sum(fed, 4), rel=0.03)
    assert noise_std_of_sum(fed, 3) == pytest.approx(1.0)


def test_robust_strategy_is_used_on_plain_updates() -> None:
    # Arrange: 3 honest updates (a shared direction + 5 % noise) and one scaled x100
    direction, noise = deltas(1, seed=3)[0], deltas(4, seed=4)
    updates = [{k: direction[k] + 0.05 * noise[i][k] for k in SHAPES} for i in range(4)]
    updates[3] = {k: v * 100 for k, v in updates[3].items()}
    layout = Layout.of(updates[0])
    honest = np.concatenate([np.mean([d[k] for d in updates[:3]], axis=0).ravel() for k in sorted(SHAPES)])
    distance = {}
    for strategy in ("fedmedian", "fedavg"):
        fed = descriptor("dp-user", noise=1e-9, clip=1e6, strategy=strategy)
        # Act
        released = [release(d, layout, fed) for d in updates]
        combined = combine([(f"m{i}", r.payload) for i, r in enumerate(released)], layout, fed)
        mean = mean_update(combined.kind, combined.payload, combined.count, layout)
        got = np.concatenate([mean[k].ravel() for k in sorted(SHAPES)])
        distance[combined.strategy] = np.linalg.norm(got - honest) / np.linalg.norm(honest)
    # Assert: the median stays within the honest spread; the mean is dragged ~25x the honest norm away
    assert distance["fedmedian"] < 0.1 and distance["fedavg"] > 10


def test_global_plus_delta_round_trip_and_mismatches_are_refused() -> None:
    base, local = deltas(2, seed=5)
    assert all(np.allclose(apply_update(base, delta_of(local, base))[k], local[k], atol=1e-7) for k in SHAPES)
    with pytest.raises(PrivacyError, match="not the global adapter"):
        delta_of({"other": np.zeros(3, np.float32)}, base)
    with pytest.raises(PrivacyError, match="needs the federation's CKKS context"):
        release(base, Layout.of(base), descriptor("he"))


def test_every_update_weighs_the_same_whatever_its_member_trained_on() -> None:
    # Arrange: nine honest members move a coordinate by +1, one by -1 (a member's dataset size is never sent)
    fed = descriptor("dp", noise=0.5)  # combine adds no noise: the released payloads are given here
    shapes = {k: np.full(s, 1.0, np.float32) for k, s in SHAPES.items()}
    layout = Layout.of(shapes)
    honest = encode_tensors(shapes)
    odd = encode_tensors({k: -v for k, v in shapes.items()})
    updates = [(f"m{i}", honest) for i in range(9)] + [("m9", odd)]

    # Act
    combined = combine(updates, layout, fed)
    mean = mean_update(combined.kind, combined.payload, combined.count, layout)

    # Assert
    assert combined.count == 10
    for name in SHAPES:
        np.testing.assert_allclose(mean[name], np.full(SHAPES[name], 0.8, np.float32), rtol=1e-6)


def test_an_he_member_is_protected_only_by_the_other_members_noise_shares() -> None:
    # Arrange: quorum 3, z = 1; a decrypting member subtracts its own share (1/3 of the variance) from the sum
    fed = descriptor("he+dp-user", noise=1.0, clip=1.0)
    own = noise_std_of_sum(fed, 1)
    others = np.sqrt(noise_std_of_sum(fed, 3) ** 2 - own**2)  # what is left around one update at the quorum
    # Act
    spend = round_spend(fed)
    # Assert: the accounted z is the others' noise over C, and its ε is above the z = 1 one
    assert spend is not None and spend.noise_multiplier == pytest.approx(others / 1.0)
    assert epsilon([spend], 1e-5) > epsilon([(1.0, 1.0, 1)], 1e-5)


def test_at_a_quorum_of_two_the_corrected_epsilon_is_6_58_not_4_39() -> None:
    # Arrange: the figures (z = 1, q = 1, one round, δ = 1e-5)
    fed = descriptor("he+dp-user", noise=1.0, clip=1.0, quorum=2)
    # Act
    spend = round_spend(fed)
    # Assert
    assert spend is not None and epsilon([spend], 1e-5) == pytest.approx(6.58, abs=0.01)
    assert epsilon([(1.0, 1.0, 1)], 1e-5) == pytest.approx(4.39, abs=0.01)


@pytest.mark.parametrize("mode", ["dp-user", "he+dp-user"])
def test_user_level_noise_is_refused_below_the_members_it_needs(mode: str) -> None:
    # Arrange: z = 1 on 10,000 parameters
    fed = descriptor(mode, noise=1.0, clip=1.0)
    needed = members_needed(fed, 10_000)
    # Act / Assert: the noise in the mean is at most one clipped update exactly from `needed` members on
    assert noise_to_update(fed, 10_000, needed) <= 1.0 < noise_to_update(fed, 10_000, needed - 1)
    assert check_user_level(fed, 10_000, needed) <= 1.0
    with pytest.raises(PrivacyError, match=f"needs about {needed} members"):
        check_user_level(fed, 10_000, 4)


@pytest.mark.parametrize("mode", ["dp", "he+dp"])
def test_an_example_level_update_leaves_as_trained_at_the_accounted_spend(mode: str) -> None:
    # Arrange: an update far larger than C (C bounds each example's gradient, not the update)
    fed = descriptor(mode, noise=0.7, clip=1.0)
    secret = SecretContext.generate()
    big = {k: np.full(s, 3.0, np.float32) for k, s in SHAPES.items()}
    layout = Layout.of(big)
    trained = round_spend(fed, 0.05)
    # Act
    out = release(big, layout, fed, secret.public(), trained=trained)
    # Assert: no noise and no clipping were added; the spend is the DP-SGD run's (z, q, local steps)
    assert out.spend == (0.7, 0.05, fed.local_steps)
    assert np.array_equal(out.vector, np.concatenate([big[k].ravel() for k in sorted(SHAPES)]))
    assert noise_std_of_sum(fed, 4) == 0.0


def test_an_example_level_update_without_its_dp_sgd_run_or_at_another_spend_does_not_leave() -> None:
    # Arrange
    fed = descriptor("dp", noise=0.7, clip=1.0)
    update = deltas(1)[0]
    layout = Layout.of(update)
    # Act / Assert
    with pytest.raises(PrivacyError, match="only updates trained with DP-SGD"):
        release(update, layout, fed)
    with pytest.raises(PrivacyError, match="trained at"):
        release(update, layout, fed, trained=Spend(0.3, 0.05, fed.local_steps))  # less noise than the federation's
    with pytest.raises(PrivacyError, match="sample rate"):
        round_spend(fed)


A_NAME, B_NAME = "layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"


@pytest.mark.parametrize("mode", ["he", "dp-user"])
def test_ffa_lora_aggregates_the_product_exactly_and_never_moves_a(mode: str) -> None:
    # Arrange: FFA-LoRA; every member starts each round from the global, A is the seeded init, B starts at zero
    fed = descriptor(mode, noise=1e-9 if mode == "dp-user" else 0.0, quorum=2, freeze_a=True)
    secret = SecretContext.generate() if fed.uses_he else None
    rng = np.random.default_rng(11)
    global_tensors = {A_NAME: rng.uniform(-0.1, 0.1, SHAPES[A_NAME]).astype(np.float32)}
    global_tensors[B_NAME] = np.zeros(SHAPES[B_NAME], np.float32)
    initial_a = global_tensors[A_NAME].copy()
    layout = update_layout(fed, global_tensors)

    for _ in range(3):
        # Act: four members train B only, release, the aggregator combines, every member applies the mean
        locals_ = [
            {A_NAME: global_tensors[A_NAME], B_NAME: global_tensors[B_NAME] + rng.normal(0, 0.01, SHAPES[B_NAME])}
            for _ in range(4)
        ]
        released = [
            release(delta_of(m, global_tensors, layout), layout, fed, secret.public() if secret else None)
            for m in locals_
        ]
        combined = combine([(f"m{i}", r.payload) for i, r in enumerate(released)], layout, fed, secret)
        mean = mean_update(combined.kind, combined.payload, combined.count, layout, secret)
        global_tensors = apply_update(global_tensors, mean)

        # Assert: B·A of the aggregate is the mean of the members' B·A products (float32 tolerance); A is unchanged
        wanted = np.mean([m[B_NAME].astype(np.float64) @ m[A_NAME] for m in locals_], axis=0)
        got = global_tensors[B_NAME].astype(np.float64) @ global_tensors[A_NAME]
        assert np.abs(got - wanted).max() < 1e-5 * np.abs(wanted).max()  # float32 (and CKKS) rounding
        assert np.array_equal(global_tensors[A_NAME], initial_a)
    assert layout.names == (B_NAME,)  # the update carries lora_B alone: half the bytes of A+B here
    assert len(released[0].vector) == np.prod(SHAPES[B_NAME])


def test_averaging_a_and_b_apart_is_not_the_mean_of_the_products() -> None:
    # Arrange: why FFA-LoRA: members that train A and B (mode A+B) from the same start
    rng = np.random.default_rng(3)
    members = [{k: rng.normal(0, 0.1, s) for k, s in SHAPES.items()} for _ in range(4)]
    # Act
    of_means = np.mean([m[B_NAME] for m in members], axis=0) @ np.mean([m[A_NAME] for m in members], axis=0)
    mean_of_products = np.mean([m[B_NAME] @ m[A_NAME] for m in members], axis=0)
    # Assert: the separate means miss most of the product
    assert np.linalg.norm(of_means - mean_of_products) > 0.5 * np.linalg.norm(mean_of_products)


def test_an_ffa_member_whose_training_moved_a_is_refused() -> None:
    fed = descriptor("he", freeze_a=True)
    base, local = deltas(2, seed=8)
    with pytest.raises(PrivacyError, match="frozen in this federation"):
        delta_of(local, base, update_layout(fed, base))
