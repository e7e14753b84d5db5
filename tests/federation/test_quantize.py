"""8-bit updates (federation.quantize): the codec, its unbiasedness, hostile payloads, and a q8 federation's path from
release through the aggregator's round to the mean (real signed descriptors)."""

import enum
import functools
import hashlib

import msgspec
import numpy as np
import pytest
import safetensors.numpy

from crypto.identity import Identity
from federation.descriptor import (
    AdapterConfig,
    DescriptorError,
    DpParams,
    FederationReason,
    HeParams,
    Privacy,
    sign_descriptor,
    verify_descriptor,
)
from federation.privacy import combine, mean_update, release, update_kind
from federation.quantize import SCALES, dequantize, quantize
from federation.round import RejectReason, RoundState
from federation.update import Layout, UpdateError, UpdateReason, encode_tensors
from tests.federation.updates import signed_update

SHAPES = {"layers.0.q_proj.lora_A.weight": (8, 576), "layers.0.q_proj.lora_B.weight": (576, 8)}
LAYOUT = Layout.of({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
LIMIT = 1 << 20


def tensors(seed: int = 0, std: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, std, s).astype(np.float32) for k, s in SHAPES.items()}


def describe(mode: str = "dp-user", encoding: str = "q8", noise: float = 0.01):  # type: ignore[no-untyped-def]
    data = sign_descriptor(
        Identity.generate(),
        name="fed-q8",
        base_sha256="ab" * 32,
        adapter=AdapterConfig(rank=8, alpha=16.0, targets=("q_proj",)),
        privacy=Privacy(
            mode=mode,  # type: ignore[arg-type]
            dp=DpParams(clip_norm=100.0, noise_multiplier=noise),
            he=HeParams() if "he" in mode else None,
        ),
        quorum=2,
        min_members=2,
        update_encoding=encoding,  # type: ignore[arg-type]
    )
    return verify_descriptor(data)


def test_a_q8_update_is_a_quarter_of_the_bytes_and_each_value_within_one_step_of_its_scale() -> None:
    # Arrange
    update = tensors()
    # Act
    payload = quantize(update, LAYOUT, np.random.default_rng(1))
    back = dequantize(payload, LAYOUT, LIMIT)
    # Assert: ≥ 3.5× fewer bytes than float32 safetensors; every value off by less than its tensor's step
    assert len(encode_tensors(update)) / len(payload) >= 3.5
    for name, values in update.items():
        step = np.abs(values).max() / 127
        assert back[name].dtype == np.float32 and back[name].shape == values.shape
        assert np.abs(back[name] - values).max() <= step * (1 + 1e-5)
        assert np.abs(back[name]).max() == pytest.approx(np.abs(values).max(), rel=1e-6)  # the peak is exact


def test_stochastic_rounding_is_unbiased_so_a_mean_of_quantized_updates_converges_to_the_mean() -> None:
    # Arrange: one update quantized 400 times (as 400 members sending the same values would)
    update = tensors(2)
    rng = np.random.default_rng(3)
    # Act
    draws = [dequantize(quantize(update, LAYOUT, rng), LAYOUT, LIMIT) for _ in range(400)]
    # Assert: the error of the mean shrinks like 1/√400 (nearest rounding would keep a bias of up to half a step)
    for name, values in update.items():
        step = float(np.abs(values).max() / 127)
        single = np.abs(draws[0][name] - values).mean()
        mean = np.mean([d[name] for d in draws], axis=0)
        assert np.abs(mean - values).mean() < single / 8
        assert np.abs(mean - values).max() < step / 4


def test_an_all_zero_tensor_has_scale_zero_and_decodes_to_zeros() -> None:
    # Arrange
    update = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    # Act
    back = dequantize(quantize(update, LAYOUT, np.random.default_rng(0)), LAYOUT, LIMIT)
    # Assert
    assert all(not back[k].any() for k in SHAPES)


def _q8(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return safetensors.numpy.load(quantize(update, LAYOUT, np.random.default_rng(0)))


class Fault(enum.Enum):
    """Ways a q8 payload from a peer can be bad."""

    NOT_SAFETENSORS = enum.auto()
    NO_SCALES = enum.auto()
    SCALES_WRONG_LENGTH = enum.auto()
    SCALES_FLOAT64 = enum.auto()
    NEGATIVE_SCALE = enum.auto()
    NAN_SCALE = enum.auto()
    HUGE_SCALE = enum.auto()
    CODE_MINUS_128 = enum.auto()
    FLOAT_CODES = enum.auto()
    MISSING_TENSOR = enum.auto()
    EXTRA_TENSOR = enum.auto()
    WRONG_SHAPE = enum.auto()
    OVERSIZED = enum.auto()


EXPECTED = {
    Fault.NOT_SAFETENSORS: UpdateReason.MALFORMED,
    Fault.NO_SCALES: UpdateReason.MALFORMED,
    Fault.SCALES_WRONG_LENGTH: UpdateReason.MALFORMED,
    Fault.SCALES_FLOAT64: UpdateReason.MALFORMED,
    Fault.NEGATIVE_SCALE: UpdateReason.MALFORMED,
    Fault.NAN_SCALE: UpdateReason.MALFORMED,
    Fault.HUGE_SCALE: UpdateReason.NON_FINITE,
    Fault.CODE_MINUS_128: UpdateReason.MALFORMED,
    Fault.FLOAT_CODES: UpdateReason.WRONG_SHAPE,
    Fault.MISSING_TENSOR: UpdateReason.WRONG_SHAPE,
    Fault.EXTRA_TENSOR: UpdateReason.WRONG_SHAPE,
    Fault.WRONG_SHAPE: UpdateReason.WRONG_SHAPE,
    Fault.OVERSIZED: UpdateReason.OVERSIZED,
}
A, B = sorted(SHAPES)


def hostile(fault: Fault) -> bytes:
    """A q8 payload with `fault`, made from a good one."""
    parts = _q8(tensors())
    if fault is Fault.NOT_SAFETENSORS:
        return b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"
    if fault is Fault.NO_SCALES:
        del parts[SCALES]
    elif fault is Fault.SCALES_WRONG_LENGTH:
        parts[SCALES] = np.ones(3, np.float32)
    elif fault is Fault.SCALES_FLOAT64:
        parts[SCALES] = parts[SCALES].astype(np.float64)
    elif fault is Fault.NEGATIVE_SCALE:
        parts[SCALES][0] = -1.0
    elif fault is Fault.NAN_SCALE:
        parts[SCALES][1] = np.nan
    elif fault is Fault.HUGE_SCALE:
        parts[SCALES][0] = np.float32(3e38)  # finite, but 127 × it is not
    elif fault is Fault.CODE_MINUS_128:
        parts[A][0, 0] = -128
    elif fault is Fault.FLOAT_CODES:
        parts[A] = parts[A].astype(np.float32)
    elif fault is Fault.MISSING_TENSOR:
        del parts[B]
    elif fault is Fault.EXTRA_TENSOR:
        parts["layers.0.v_proj.lora_A.weight"] = np.zeros((8, 576), np.int8)
    elif fault is Fault.WRONG_SHAPE:
        parts[A] = parts[A].reshape(576, 8)
    elif fault is Fault.OVERSIZED:
        return b"\0" * (LIMIT + 1)
    return safetensors.numpy.save(parts)


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_a_hostile_q8_payload_is_refused_with_its_reason(fault: Fault) -> None:
    # Arrange
    data = hostile(fault)
    # Act
    with pytest.raises(UpdateError) as refused:
        dequantize(data, LAYOUT, LIMIT)
    # Assert
    assert refused.value.reason is EXPECTED[fault]


def test_an_f32_descriptor_signs_the_same_bytes_as_before_the_field_existed() -> None:
    # Arrange / Act
    f32, q8 = describe(encoding="f32"), describe(encoding="q8")
    # Assert: "f32" is left out of the signed bytes (old signatures verify), "q8" is in them
    assert b"update_encoding" not in f32.signed_bytes() and b'"update_encoding":"q8"' in q8.signed_bytes()
    assert update_kind(f32) == "plain" and update_kind(q8) == "q8"
    old = msgspec.json.decode(msgspec.json.encode(f32))
    assert "update_encoding" not in old
    assert verify_descriptor(msgspec.json.encode(old)).federation_id == f32.federation_id


def test_q8_is_refused_under_he() -> None:
    # Act
    with pytest.raises(DescriptorError) as refused:
        describe("he", "q8", noise=0.0)
    # Assert
    assert refused.value.reason is FederationReason.INCONSISTENT and "CKKS" in refused.value.detail


def test_a_q8_federation_releases_8_bit_updates_that_the_round_accepts_and_the_mean_keeps() -> None:
    # Arrange: 4 members of a dp-user federation with 8-bit updates
    fed = describe()
    members = sorted((Identity.generate() for _ in range(4)), key=lambda i: i.fingerprint)
    keys = {m.fingerprint: m.public_key_b64() for m in members}
    fid = fed.federation_id
    state = RoundState(fid, 3, keys, 2, 2e9, LAYOUT, update_kind(fed), LIMIT, clock=lambda: 1e9)
    update = functools.partial(signed_update, fid=fid, layout=LAYOUT.digest())
    deltas = [tensors(10 + i) for i in range(4)]
    # Act
    released = [release(d, LAYOUT, fed, rng=np.random.default_rng(i)) for i, d in enumerate(deltas)]
    results = [state.receive(*update(m, r.payload, kind=r.kind)) for m, r in zip(members, released, strict=True)]
    combined = combine([(a.member, a.payload) for a in state.close()], LAYOUT, fed)
    mean = mean_update(combined.kind, combined.payload, combined.count, LAYOUT)
    # Assert: q8 on the wire, a quarter of the bytes, every update accepted
    assert all(r.kind == "q8" for r in released)
    assert all(len(encode_tensors(d)) / len(r.payload) >= 3.5 for d, r in zip(deltas, released, strict=True))
    assert [type(r).__name__ for r in results] == ["Accepted"] * 4
    # the mean equals the mean of what each member released (its dequantized values), to float tolerance
    expected = np.mean([r.vector for r in released], axis=0)
    got = np.concatenate([mean[k].ravel() for k in LAYOUT.names])
    assert combined.kind == "plain" and np.allclose(got, expected, atol=1e-7)


def test_a_float32_payload_sent_as_q8_is_refused_as_malformed() -> None:
    # Arrange
    node = Identity.generate()
    fid = hashlib.sha256(b"q8").hexdigest()
    state = RoundState(
        fid, 3, {node.fingerprint: node.public_key_b64()}, 2, 2e9, LAYOUT, "q8", LIMIT, clock=lambda: 1e9
    )
    # Act
    result = state.receive(*signed_update(node, encode_tensors(tensors()), fid=fid, kind="q8", layout=LAYOUT.digest()))
    # Assert
    assert result.reason is RejectReason.MALFORMED  # type: ignore[union-attr]
    assert state.updates() == []
