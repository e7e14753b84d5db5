"""Sealing a secret (e.g. a serialized CKKS secret context) to one member's key.

Each node has an X25519 key derived from its Ed25519 identity: HKDF-SHA256 over the 32-byte Ed25519 private seed
(no salt, info b"mirador x25519 v1"). It is a separate key, not the Ed25519 key converted, so its public half
cannot be computed from the Ed25519 public key: a node publishes `x25519_public_of(identity)` (in a record signed
by its identity) for others to seal to.

A sealed box (ECIES-like, cf. libsodium's crypto_box_seal):
    magic b"MRSL" | version u8 (1) | ephemeral X25519 public key (32) | ChaCha20-Poly1305 ciphertext + tag (16)
key and nonce = HKDF-SHA256(X25519(ephemeral, recipient), info = b"mirador seal v1" + ephemeral pub + recipient
pub), 44 bytes; a fresh ephemeral key per box makes the fixed derivation of the nonce safe. The associated data is
the header followed by the caller's `context` (e.g. federation id + recipient fingerprint), so a box opens only for
the same context and cannot be replayed elsewhere. The box does not say who sealed it: sign it if that matters.
"""

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.identity import Identity
from crypto.refusal import Refused, SingleReason

MAGIC = b"MRSL"
VERSION = 1
X25519_KEY_SIZE = 32
TAG_SIZE = 16
MAX_PLAINTEXT_BYTES = 16 * 1024 * 1024
MAX_CONTEXT_BYTES = 4096
X25519_INFO = b"mirador x25519 v1"
SEAL_INFO = b"mirador seal v1"

_HEADER = struct.Struct(">4sB32s")
_KEY_SIZE = 32
_NONCE_SIZE = 12
OVERHEAD = _HEADER.size + TAG_SIZE


class SealError(SingleReason, Refused):
    """A sealed box that cannot be made or opened: tampered, truncated, wrong key, wrong context, or too large
    (reason bad_seal)."""

    REASON = "bad_seal"


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 with no salt."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def _ed25519_seed(identity: Identity) -> bytes:
    """The 32-byte Ed25519 private seed of `identity` (through its PKCS#8 export, the public API of Identity)."""
    key = serialization.load_pem_private_key(identity.to_pem(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SealError(f"expected an Ed25519 identity, found {type(key).__name__}")
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def x25519_private_of(identity: Identity) -> X25519PrivateKey:
    """The X25519 key of `identity`, derived deterministically from its Ed25519 seed."""
    return X25519PrivateKey.from_private_bytes(_hkdf(_ed25519_seed(identity), X25519_INFO, X25519_KEY_SIZE))


def x25519_public_of(identity: Identity) -> bytes:
    """The raw 32-byte X25519 public key others seal to for `identity`."""
    return _raw_public(x25519_private_of(identity).public_key())


def _raw_public(key: X25519PublicKey) -> bytes:
    """Raw 32 bytes of an X25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _box_key(shared: bytes, ephemeral_pub: bytes, recipient_pub: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    """The AEAD and nonce of one box, bound to both public keys."""
    okm = _hkdf(shared, SEAL_INFO + ephemeral_pub + recipient_pub, _KEY_SIZE + _NONCE_SIZE)
    return ChaCha20Poly1305(okm[:_KEY_SIZE]), okm[_KEY_SIZE:]


def _check_context(context: bytes) -> None:
    """Refuse a missing or oversized context: a box must be bound to where it may be opened."""
    if not isinstance(context, bytes) or not context:
        raise SealError("a non-empty bytes context is required (e.g. federation id + recipient fingerprint)")
    if len(context) > MAX_CONTEXT_BYTES:
        raise SealError(f"context is {len(context)} bytes, more than the limit of {MAX_CONTEXT_BYTES}")


def seal(recipient_x25519_pub: bytes, plaintext: bytes, context: bytes, max_bytes: int = MAX_PLAINTEXT_BYTES) -> bytes:
    """Encrypt `plaintext` so that only the holder of the recipient's X25519 key can open it, under `context`."""
    _check_context(context)
    if len(plaintext) > max_bytes:
        raise SealError(f"plaintext is {len(plaintext)} bytes, more than the limit of {max_bytes}")
    if len(recipient_x25519_pub) != X25519_KEY_SIZE:
        raise SealError(f"an X25519 public key is {X25519_KEY_SIZE} bytes, got {len(recipient_x25519_pub)}")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_pub = _raw_public(ephemeral.public_key())
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_x25519_pub))
    except ValueError as exc:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise SealError(f"unusable recipient X25519 public key: {exc}") from exc
    aead, nonce = _box_key(shared, ephemeral_pub, recipient_x25519_pub)
    header = _HEADER.pack(MAGIC, VERSION, ephemeral_pub)
    return header + aead.encrypt(nonce, plaintext, header + context)


def unseal(identity: Identity, sealed: bytes, context: bytes, max_bytes: int = MAX_PLAINTEXT_BYTES) -> bytes:
    """Open a box sealed to `identity` under `context`; raise SealError for anything else."""
    _check_context(context)
    if len(sealed) > max_bytes + OVERHEAD:
        raise SealError(f"sealed box is {len(sealed)} bytes, more than the limit of {max_bytes + OVERHEAD}")
    if len(sealed) < OVERHEAD:
        raise SealError(f"sealed box truncated: {len(sealed)} bytes, at least {OVERHEAD} expected")
    magic, version, ephemeral_pub = _HEADER.unpack_from(sealed)
    if magic != MAGIC:
        raise SealError(f"not a sealed box: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise SealError(f"unsupported sealed box version {version}, expected {VERSION}")
    private = x25519_private_of(identity)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_pub))
    except ValueError as exc:
        raise SealError(f"unusable ephemeral key in the sealed box: {exc}") from exc
    aead, nonce = _box_key(shared, ephemeral_pub, _raw_public(private.public_key()))
    header = bytes(sealed[: _HEADER.size])
    try:
        return aead.decrypt(nonce, bytes(sealed[_HEADER.size :]), header + context)
    except InvalidTag as exc:
        raise SealError("cannot open the sealed box: wrong recipient, wrong context, or tampered bytes") from exc
