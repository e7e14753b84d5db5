"""CKKS aggregation: sums decrypt to the plaintext sum, public contexts cannot decrypt, bytes are parsed strictly."""

import struct

import numpy as np
import pytest
import tenseal as ts

from crypto.he import (
    MAGIC,
    EncryptedVector,
    HEError,
    HEFormatError,
    HEKeyError,
    HEParams,
    HEParamsError,
    HEShapeError,
    PublicContext,
    SecretContext,
    add_encrypted,
    decrypt_vector,
    encrypt_vector,
)

N_VALUES = 20_000


@pytest.fixture(scope="module")
def secret() -> SecretContext:
    """One CKKS key set for the module."""
    return SecretContext.generate()


@pytest.fixture(scope="module")
def public(secret: SecretContext) -> PublicContext:
    """The aggregator's view of the module's key set, loaded from its bytes."""
    return PublicContext.from_bytes(secret.public_bytes(), params=HEParams())


@pytest.fixture(scope="module")
def updates() -> list[np.ndarray]:
    """Four float32 updates of N(0, 0.01)."""
    rng = np.random.default_rng(7)
    return [rng.normal(0.0, 0.01, N_VALUES).astype(np.float32) for _ in range(4)]


@pytest.fixture(scope="module")
def serialized(secret: SecretContext, updates: list[np.ndarray]) -> bytes:
    """The first update encrypted and serialized."""
    return encrypt_vector(secret, updates[0]).serialize()


def test_sum_of_four_decrypts_to_the_plaintext_sum(
    secret: SecretContext, public: PublicContext, updates: list[np.ndarray]
) -> None:
    wire = [encrypt_vector(secret, u).serialize() for u in updates]
    total = add_encrypted([EncryptedVector.deserialize(public, w) for w in wire])  # the aggregator's side
    result = decrypt_vector(secret, EncryptedVector.deserialize(secret, total.serialize()))
    expected = np.sum([u.astype(np.float64) for u in updates], axis=0)
    abs_err = np.abs(result - expected)
    rel_err = abs_err.max() / np.abs(expected).max()
    print(f"\nCKKS sum of 4 x {N_VALUES}: max abs error {abs_err.max():.3e}, max error / max |sum| {rel_err:.3e}")
    assert result.shape == (N_VALUES,) and result.dtype == np.float64
    assert rel_err < 1e-5
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert decrypt_vector(secret, total, dtype=np.float32).dtype == np.float32


def test_public_context_has_no_secret_key_and_cannot_decrypt(
    secret: SecretContext, public: PublicContext, updates: list[np.ndarray]
) -> None:
    assert not ts.context_from(secret.public_bytes()).is_private()
    assert not public.has_secret_key and secret.has_secret_key
    assert public.key_id == secret.key_id
    enc = encrypt_vector(public, updates[0])  # anyone may encrypt
    with pytest.raises(HEKeyError, match="secret"):
        decrypt_vector(public, enc)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="secret_key"):
        enc.chunks[0].decrypt()  # TenSEAL itself has nothing to decrypt with


def test_public_context_bytes_are_smaller_without_relin_keys(secret: SecretContext) -> None:
    with_relin = secret.tenseal.serialize(save_secret_key=False, save_relin_keys=True)
    print(f"\npublic context: {len(secret.public_bytes())} bytes, {len(with_relin)} with relin keys")
    assert len(secret.public_bytes()) < len(with_relin)


def test_a_public_context_with_a_smuggled_secret_key_is_refused(secret: SecretContext) -> None:
    with pytest.raises(HEKeyError, match="secret key"):
        PublicContext.from_bytes(secret.serialize())
    with_secret = secret.tenseal.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    with pytest.raises(HEKeyError, match="secret key"):
        PublicContext.from_bytes(with_secret)
    with pytest.raises(HEKeyError, match="no secret key"):
        SecretContext.from_bytes(secret.public_bytes())


def test_secret_context_round_trip_keeps_the_key(secret: SecretContext, updates: list[np.ndarray]) -> None:
    again = SecretContext.from_bytes(secret.serialize())
    assert again.key_id == secret.key_id and again.params == secret.params
    enc = encrypt_vector(again, updates[1])
    np.testing.assert_allclose(decrypt_vector(secret, enc), updates[1], atol=1e-6)


def test_serialized_vector_round_trip(
    secret: SecretContext, public: PublicContext, serialized: bytes, updates: list[np.ndarray]
) -> None:
    enc = EncryptedVector.deserialize(public, serialized)
    assert enc.length == N_VALUES and enc.chunk_count == 5 and enc.key_id == secret.key_id
    assert enc.serialize() == serialized
    np.testing.assert_allclose(decrypt_vector(secret, enc), updates[0], atol=1e-6)


def test_vector_of_another_key_is_refused(public: PublicContext, updates: list[np.ndarray]) -> None:
    other = SecretContext.generate()
    with pytest.raises(HEKeyError, match="encrypted under key"):
        EncryptedVector.deserialize(public, encrypt_vector(other, updates[0]).serialize())
    with pytest.raises(HEKeyError, match="another key"):
        add_encrypted([encrypt_vector(public, updates[0]), encrypt_vector(other, updates[0])])
    with pytest.raises(HEKeyError, match="encrypted under key"):
        decrypt_vector(other, encrypt_vector(public, updates[0]))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-1], "digest mismatch"),
        (lambda b: b[: len(b) // 2], "digest mismatch"),
        (lambda b: b[:20], "truncated"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x09" + b[5:], "version"),
        (lambda b: b[:-4000] + bytes([b[-4000] ^ 1]) + b[-3999:], "digest mismatch"),
        (lambda b: b + b"\x00", "digest mismatch"),
    ],
    ids=["last-byte-cut", "half", "header-cut", "magic", "version", "flipped-bit", "trailing-byte"],
)
def test_corrupted_or_truncated_vector_is_refused(
    public: PublicContext, serialized: bytes, mutate: object, message: str
) -> None:
    with pytest.raises(HEFormatError, match=message):
        EncryptedVector.deserialize(public, mutate(serialized))  # type: ignore[operator]


def _rebuild(header: bytes, body: bytes) -> bytes:
    """Header + body with a valid digest (the checks behind the digest)."""
    import hashlib

    data = header + body
    return data + hashlib.sha256(data).digest()


def test_inconsistent_header_and_bad_chunks_are_refused_behind_a_valid_digest(
    public: PublicContext, serialized: bytes
) -> None:
    header, body = serialized[:33], serialized[33:-32]
    magic, version, key_id, length, count = struct.unpack(">4sB16sQI", header)
    wrong_count = struct.pack(">4sB16sQI", magic, version, key_id, length, count + 1)
    with pytest.raises(HEFormatError, match="chunks"):
        EncryptedVector.deserialize(public, _rebuild(wrong_count, body))
    wrong_length = struct.pack(">4sB16sQI", magic, version, key_id, length - 4096, count)
    with pytest.raises(HEFormatError, match="chunks"):
        EncryptedVector.deserialize(public, _rebuild(wrong_length, body))
    fewer_last = struct.pack(">4sB16sQI", magic, version, key_id, length - 1, count)
    with pytest.raises(HEFormatError, match="chunk 4: holds"):
        EncryptedVector.deserialize(public, _rebuild(fewer_last, body))
    (first_size,) = struct.unpack_from(">I", body)
    garbled = body[:4] + bytes(first_size) + body[4 + first_size :]
    with pytest.raises(HEFormatError, match="chunk 0: not a CKKS vector"):
        EncryptedVector.deserialize(public, _rebuild(header, garbled))
    with pytest.raises(HEFormatError, match="announced"):
        EncryptedVector.deserialize(public, _rebuild(header, struct.pack(">I", 10**9) + body[4:]))
    with pytest.raises(HEFormatError, match="unexpected bytes"):
        EncryptedVector.deserialize(public, _rebuild(header, body + b"\x00"))


def test_oversized_inputs_are_refused_before_parsing(
    secret: SecretContext, public: PublicContext, serialized: bytes
) -> None:
    with pytest.raises(HEFormatError, match="more than the limit"):
        EncryptedVector.deserialize(public, serialized, max_bytes=len(serialized) - 1)
    with pytest.raises(HEFormatError, match="more than the limit"):
        PublicContext.from_bytes(secret.public_bytes(), max_bytes=1000)
    with pytest.raises(HEFormatError, match="not a serialized TenSEAL context"):
        PublicContext.from_bytes(b"\x00" * 100)
    with pytest.raises(HEFormatError, match="magic"):
        EncryptedVector.deserialize(public, MAGIC[::-1] + bytes(100))


def test_add_refuses_mismatched_lengths_and_nothing(public: PublicContext, updates: list[np.ndarray]) -> None:
    a = encrypt_vector(public, updates[0])
    b = encrypt_vector(public, updates[1][:-1])  # same chunk count, one value fewer
    c = encrypt_vector(public, updates[1][:4096])
    with pytest.raises(HEShapeError, match="vector 1 has 19999 values"):
        add_encrypted([a, b])
    with pytest.raises(HEShapeError, match="vector 1 has 4096 values in 1 chunks"):
        add_encrypted([a, c])
    with pytest.raises(HEShapeError, match="no encrypted vectors"):
        add_encrypted([])
    assert add_encrypted([a]) is a


def test_encrypt_refuses_bad_vectors(public: PublicContext) -> None:
    with pytest.raises(HEShapeError, match="1-D"):
        encrypt_vector(public, np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(HEShapeError, match="non-empty"):
        encrypt_vector(public, np.zeros(0, dtype=np.float32))
    with pytest.raises(HEError, match="NaN or infinite value at index 3"):
        encrypt_vector(public, np.array([0, 0, 0, np.nan], dtype=np.float32))
    with pytest.raises(HEError, match="out of range"):
        encrypt_vector(public, np.array([0.0, 1e4]))
    with pytest.raises(HEError, match="float"):
        encrypt_vector(public, np.arange(4))


def test_params_are_validated_and_checked_on_load(secret: SecretContext) -> None:
    assert HEParams().slots == 4096 and HEParams().max_abs_value == 512.0
    with pytest.raises(HEParamsError, match="poly_modulus_degree"):
        HEParams(poly_modulus_degree=1000)
    with pytest.raises(HEParamsError, match="128-bit security"):
        HEParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 60))
    with pytest.raises(HEParamsError, match="coeff_mod_bit_sizes"):
        HEParams(coeff_mod_bit_sizes=(60,))
    with pytest.raises(HEParamsError, match="no room"):
        HEParams(global_scale_bits=55)
    other = HEParams(poly_modulus_degree=16384, coeff_mod_bit_sizes=(60, 40, 40, 60))
    with pytest.raises(HEParamsError, match="expected"):
        PublicContext.from_bytes(secret.public_bytes(), params=other)
