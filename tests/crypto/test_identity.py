"""Ed25519 identity: sign, verify, round-trip, encrypted backups, public key export, refuse foreign key types."""

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from crypto.identity import (
    Identity,
    IdentityFormatError,
    KeyFormatError,
    PassphraseError,
    PublicKey,
    fingerprint_of,
    is_encrypted_pem,
    is_fingerprint,
    verify_signature,
)


def test_sign_and_verify() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"payload")
    assert verify_signature(ident.public_key_bytes, sig, b"payload")
    assert not verify_signature(ident.public_key_bytes, sig, b"payload!")
    assert not verify_signature(Identity.generate().public_key_bytes, sig, b"payload")


def test_pem_round_trip_keeps_the_fingerprint() -> None:
    ident = Identity.generate()
    again = Identity.from_pem(ident.to_pem())
    assert again.fingerprint == ident.fingerprint
    assert again.fingerprint.startswith("ed25519:") and len(again.fingerprint) == 8 + 32


def test_non_ed25519_key_is_refused() -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(IdentityFormatError, match="expected an Ed25519 key"):
        Identity.from_pem(pem)


def test_garbage_is_refused() -> None:
    with pytest.raises(IdentityFormatError):
        Identity.from_pem(b"not a key")


def test_encrypted_pem_round_trip_keeps_the_key() -> None:
    ident = Identity.generate()

    pem = ident.to_encrypted_pem("correct horse")
    again = Identity.from_encrypted_pem(pem, b"correct horse")

    assert is_encrypted_pem(pem) and not is_encrypted_pem(ident.to_pem())
    assert again.fingerprint == ident.fingerprint
    assert pem.startswith(b"-----BEGIN MIRADOR ENCRYPTED PRIVATE KEY-----\n")


@pytest.mark.parametrize(
    ("passphrase", "message"),
    [("wrong", "wrong passphrase"), ("", "passphrase is empty")],
)
def test_encrypted_pem_refuses_a_bad_passphrase(passphrase: str, message: str) -> None:
    pem = Identity.generate().to_encrypted_pem("the right passphrase")

    with pytest.raises(PassphraseError, match=message):
        Identity.from_encrypted_pem(pem, passphrase)


def test_plain_and_encrypted_loaders_name_the_other_format() -> None:
    ident = Identity.generate()

    with pytest.raises(PassphraseError, match="passphrase is needed"):
        Identity.from_pem(ident.to_encrypted_pem("a long passphrase"))
    with pytest.raises(IdentityFormatError, match="not an encrypted"):
        Identity.from_encrypted_pem(ident.to_pem(), "a long passphrase")
    with pytest.raises(PassphraseError, match="empty"):
        ident.to_encrypted_pem(b"")


@pytest.mark.parametrize("passphrase", ["x", "hunter2", "elevenchars"])
def test_a_backup_needs_a_passphrase_of_twelve_characters(passphrase: str) -> None:
    with pytest.raises(PassphraseError, match="at least 12 characters"):
        Identity.generate().to_encrypted_pem(passphrase)


def test_a_backup_is_scrypt_and_aes_gcm_with_the_documented_parameters() -> None:
    # Arrange
    ident = Identity.generate()
    pem = ident.to_encrypted_pem("correct horse battery")
    blob = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    tampered_blob = bytearray(blob)
    tampered_blob[16] = 4  # r = 4 instead of 8: the header is authenticated
    body = base64.encodebytes(bytes(tampered_blob))
    tampered = pem.splitlines(keepends=True)[0] + body + pem.splitlines(keepends=True)[-1]

    # Act
    magic, log2_n, r, p = blob[:15], blob[15], blob[16], blob[17]

    # Assert: n = 2^17, r = 8, p = 1 (128 MiB per guess), not PBKDF2 with 2048 iterations
    assert (magic, log2_n, r, p) == (b"mirador-key-v1\0", 17, 8, 1)
    with pytest.raises(PassphraseError):
        Identity.from_encrypted_pem(tampered, "correct horse battery")


def test_a_backup_of_an_earlier_version_still_loads() -> None:
    # Arrange: what `mirador keys export` wrote before (PKCS#8, BestAvailableEncryption)
    ident = Identity.generate()
    legacy = ident._key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )

    # Act
    again = Identity.from_encrypted_pem(legacy, "pw")

    # Assert
    assert is_encrypted_pem(legacy) and again.fingerprint == ident.fingerprint


def test_public_key_exports_round_trip_with_the_same_fingerprint() -> None:
    ident = Identity.generate()

    from_b64 = PublicKey.from_b64(ident.public_key_b64())
    from_pem = PublicKey.from_pem(ident.public_key.to_pem())

    assert from_b64 == from_pem == ident.public_key
    assert from_b64.fingerprint == ident.fingerprint == fingerprint_of(ident.public_key_bytes)
    assert len(ident.public_key_b64()) == 44
    assert from_b64.verify(ident.sign(b"x"), b"x") and not from_b64.verify(ident.sign(b"x"), b"y")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("AAAA", "32 bytes"),
        ("not base64!", "not standard base64"),
        (base64.urlsafe_b64encode(b"\xfb" * 32).decode(), "not standard base64"),
        (base64.b64encode(b"\x01" * 32).decode().rstrip("="), "base64"),
    ],
    ids=["short", "garbage", "urlsafe", "unpadded"],
)
def test_public_key_from_b64_refuses_malformed_text(text: str, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        PublicKey.from_b64(text)


def test_public_key_from_pem_refuses_other_key_types() -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    with pytest.raises(KeyFormatError, match="expected an Ed25519 public key"):
        PublicKey.from_pem(pem)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("ed25519:" + "0a" * 16, True),
        ("ed25519:" + "0A" * 16, False),
        ("ed25519:" + "0a" * 15, False),
        ("rsa:" + "0a" * 16, False),
    ],
)
def test_is_fingerprint(text: str, ok: bool) -> None:
    assert is_fingerprint(text) is ok
