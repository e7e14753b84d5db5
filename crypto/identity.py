"""The node identity: one Ed25519 key that signs everything the node publishes.

Key export/import for `mirador keys show|export|import`:
- the public key travels as raw 32 bytes in standard base64 (44 characters) or as SubjectPublicKeyInfo PEM
  (what openssl, cosign and model_signing read);
- its fingerprint is 'ed25519:' + the first 16 bytes of sha256(raw public key), hex (32 characters);
- the private key is PKCS#8 PEM, unencrypted for identity.key (0600); a backup is the raw private key sealed with
  AES-256-GCM under a key derived from the passphrase by scrypt (n = 2^17, r = 8, p = 1: 128 MiB and ~0.4 s per
  try; RFC 7914, the parameters OWASP recommends at least), PEM-armoured as "MIRADOR ENCRYPTED PRIVATE KEY". A new
  backup needs a passphrase of at least 12 characters. PKCS#8 "ENCRYPTED PRIVATE KEY" backups made by earlier
  versions (PBKDF2, 2048 iterations) still load.
"""

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

FINGERPRINT_PREFIX = "ed25519:"
PUBLIC_KEY_SIZE = 32
_ENCRYPTED_PEM_HEADER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"  # PKCS#8 backups of earlier versions
_BACKUP_LABEL = "MIRADOR ENCRYPTED PRIVATE KEY"
_BACKUP_MAGIC = b"mirador-key-v1\0"
_BACKUP_HEADER = struct.Struct(">15sBBB16s12s")  # magic, log2 n, r, p, salt, nonce; then the sealed 32-byte key
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 17, 8, 1
MAX_SCRYPT_LOG2_N = 20  # a backup asking for more (1 GiB per try) is refused, not computed
MIN_PASSPHRASE_CHARS = 12
MAX_BACKUP_BYTES = 4096


class KeyFormatError(ValueError):
    """Bytes or text that are not a usable Ed25519 key."""


class IdentityFormatError(KeyFormatError):
    """The bytes given are not a usable PKCS#8 PEM Ed25519 private key."""


class PassphraseError(IdentityFormatError):
    """An encrypted private key with a missing or wrong passphrase."""


def fingerprint_of(public_key_bytes: bytes) -> str:
    """'ed25519:' + 16 bytes of sha256 of the raw public key, hex: the printable name of a publisher."""
    return FINGERPRINT_PREFIX + hashlib.sha256(public_key_bytes).hexdigest()[:32]


def is_fingerprint(text: str) -> bool:
    """True if `text` has the shape of a fingerprint ('ed25519:' + 32 lowercase hex digits)."""
    digits = text.removeprefix(FINGERPRINT_PREFIX)
    return text.startswith(FINGERPRINT_PREFIX) and len(digits) == 32 and all(c in "0123456789abcdef" for c in digits)


def strict_b64decode(text: str) -> bytes:
    """Decode standard, padded, canonical base64 (one encoding per value); raise ValueError for anything else."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"not standard base64: {exc}") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("not canonical base64 (standard alphabet, with padding)")
    return raw


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key (raw 32 bytes) with its fingerprint; what a verifier needs of a publisher."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != PUBLIC_KEY_SIZE:
            raise KeyFormatError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, got {len(self.raw)}")

    @classmethod
    def from_b64(cls, text: str) -> "PublicKey":
        """Load a public key from standard base64 of its raw 32 bytes."""
        try:
            raw = strict_b64decode(text)
        except ValueError as exc:
            raise KeyFormatError(f"public key: {exc}") from exc
        return cls(raw)

    @classmethod
    def from_pem(cls, data: bytes) -> "PublicKey":
        """Load a public key from SubjectPublicKeyInfo PEM; refuse any other key type."""
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise KeyFormatError(f"not a PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFormatError(f"expected an Ed25519 public key, found {type(key).__name__}")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def to_b64(self) -> str:
        """Standard base64 of the raw 32 bytes (44 characters)."""
        return base64.b64encode(self.raw).decode("ascii")

    def to_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM, for openssl and other tools."""
        return Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def fingerprint(self) -> str:
        """'ed25519:' + 16 bytes of sha256 of the raw key, hex."""
        return fingerprint_of(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Return True only if `signature` is a valid signature of `data` by this key."""
        return verify_signature(self.raw, signature, data)


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    """The passphrase as bytes (UTF-8 for text); refuse an empty one."""
    data = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
    if not data:
        raise PassphraseError("the passphrase is empty")
    return data


def is_encrypted_pem(data: bytes) -> bool:
    """True if `data` is an encrypted private key backup (ask for a passphrase before loading it)."""
    start = data.lstrip()
    return start.startswith(_ENCRYPTED_PEM_HEADER) or start.startswith(f"-----BEGIN {_BACKUP_LABEL}-----".encode())


def _scrypt_key(passphrase: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=1 << log2_n, r=r, p=p).derive(passphrase)


def _seal_backup(raw_key: bytes, passphrase: bytes) -> bytes:
    """The PEM backup of a raw Ed25519 private key (see the module docstring)."""
    salt, nonce = os.urandom(16), os.urandom(12)
    header = _BACKUP_HEADER.pack(_BACKUP_MAGIC, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P, salt, nonce)
    key = _scrypt_key(passphrase, salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
    body = base64.encodebytes(header + AESGCM(key).encrypt(nonce, raw_key, header)).decode("ascii")
    return f"-----BEGIN {_BACKUP_LABEL}-----\n{body}-----END {_BACKUP_LABEL}-----\n".encode("ascii")


def _open_backup(data: bytes, passphrase: bytes) -> bytes:
    """The raw private key in a PEM backup; IdentityFormatError if malformed, PassphraseError if it does not open."""
    if len(data) > MAX_BACKUP_BYTES:
        raise IdentityFormatError(f"a key backup is at most {MAX_BACKUP_BYTES} bytes, this is {len(data)}")
    lines = data.decode("ascii", errors="replace").strip().splitlines()
    armour = (f"-----BEGIN {_BACKUP_LABEL}-----", f"-----END {_BACKUP_LABEL}-----")
    if len(lines) < 3 or (lines[0], lines[-1]) != armour:
        raise IdentityFormatError("not a Mirador encrypted private key backup")
    try:
        blob = base64.b64decode("".join(lines[1:-1]), validate=True)
    except binascii.Error as exc:
        raise IdentityFormatError(f"the backup is not base64: {exc}") from None
    if len(blob) != _BACKUP_HEADER.size + 32 + 16:
        raise IdentityFormatError(f"the backup is {len(blob)} bytes, not {_BACKUP_HEADER.size + 48}")
    header, sealed = blob[: _BACKUP_HEADER.size], blob[_BACKUP_HEADER.size :]
    magic, log2_n, r, p, salt, nonce = _BACKUP_HEADER.unpack(header)
    if magic != _BACKUP_MAGIC or not (1 <= log2_n <= MAX_SCRYPT_LOG2_N and 1 <= r <= 32 and 1 <= p <= 16):
        raise IdentityFormatError(f"unsupported backup version or scrypt parameters (n = 2^{log2_n}, r = {r}, p = {p})")
    try:
        return AESGCM(_scrypt_key(passphrase, salt, log2_n, r, p)).decrypt(nonce, sealed, header)
    except InvalidTag:
        raise PassphraseError("cannot decrypt the private key (wrong passphrase?)") from None


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
        if is_encrypted_pem(data):
            raise PassphraseError("the private key is encrypted: a passphrase is needed")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityFormatError(f"not an unencrypted PEM private key: {exc}") from exc
        return cls._checked(key)

    @classmethod
    def from_encrypted_pem(cls, data: bytes, passphrase: str | bytes) -> "Identity":
        """Load an identity from a passphrase-encrypted backup (`to_encrypted_pem`, or an earlier version's PKCS#8)."""
        if not is_encrypted_pem(data):
            raise IdentityFormatError(f"not an encrypted private key backup (BEGIN {_BACKUP_LABEL})")
        if not data.lstrip().startswith(_ENCRYPTED_PEM_HEADER):
            return cls(Ed25519PrivateKey.from_private_bytes(_open_backup(data, _passphrase_bytes(passphrase))))
        try:
            key = serialization.load_pem_private_key(data, password=_passphrase_bytes(passphrase))
        except ValueError as exc:
            raise PassphraseError(f"cannot decrypt the private key (wrong passphrase?): {exc}") from exc
        except TypeError as exc:
            raise IdentityFormatError(f"not an encrypted PEM private key: {exc}") from exc
        return cls._checked(key)

    @classmethod
    def _checked(cls, key: object) -> "Identity":
        """Wrap `key` if it is an Ed25519 private key."""
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityFormatError(f"expected an Ed25519 key, found {type(key).__name__}")
        return cls(key)

    def to_pem(self) -> bytes:
        """Serialize the private key as unencrypted PKCS#8 PEM (store it 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def to_encrypted_pem(self, passphrase: str | bytes) -> bytes:
        """A backup of the private key: scrypt + AES-256-GCM under `passphrase` (at least 12 characters), PEM."""
        secret = _passphrase_bytes(passphrase)
        if len(secret.decode("utf-8", errors="replace")) < MIN_PASSPHRASE_CHARS:
            raise PassphraseError(f"the passphrase is too short: use at least {MIN_PASSPHRASE_CHARS} characters")
        raw = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return _seal_backup(raw, secret)

    @property
    def public_key(self) -> PublicKey:
        """The public half, for export and for verifiers."""
        return PublicKey(self.public_key_bytes)

    def public_key_b64(self) -> str:
        """Standard base64 of the raw 32-byte public key (what `mirador keys show` prints)."""
        return self.public_key.to_b64()

    @property
    def fingerprint(self) -> str:
        """Short, stable, printable name of the public key: 'ed25519:' + 16 bytes of its sha256, hex."""
        return fingerprint_of(self.public_key_bytes)

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
