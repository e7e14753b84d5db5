"""Ed25519 identity: sign, verify, round-trip, refuse foreign key types."""

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from crypto.identity import Identity, IdentityFormatError, verify_signature


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
