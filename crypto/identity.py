"""The node identity: one Ed25519 key that signs everything the node publishes."""

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class IdentityFormatError(ValueError):
    """The bytes given are not an unencrypted PKCS#8 PEM Ed25519 private key."""


class Identity:
    """An Ed25519 signing key with its public half and a short printable fingerprint."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> "Identity":
        """Create a fresh random identity."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> "Identity":
        """Load an identity from unencrypted PKCS#8 PEM bytes; refuse any other key type."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityFormatError(f"not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityFormatError(f"expected an Ed25519 key, found {type(key).__name__}")
        return cls(key)

    def to_pem(self) -> bytes:
        """Serialize the private key as unencrypted PKCS#8 PEM (store it 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def fingerprint(self) -> str:
        """Short, stable, printable name of the public key: 'ed25519:' + 16 bytes of its sha256, hex."""
        return "ed25519:" + hashlib.sha256(self.public_key_bytes).hexdigest()[:32]

    def sign(self, data: bytes) -> bytes:
        """Sign `data`; the signature is 64 bytes."""
        return self._key.sign(data)


def verify_signature(public_key_bytes: bytes, signature: bytes, data: bytes) -> bool:
    """Return True only if `signature` is a valid Ed25519 signature of `data` by that public key."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key_bytes).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
