"""Signed JSON structs (msgspec): canonical bytes, signing, signature checks and strict decoding, shared by every
signed message of the project (federation descriptors, invites, join requests, round messages, registry records).

A signature covers the struct's JSON without its `signature` field, keys sorted; decoding checks the size before
reading, refuses unknown fields (the structs forbid them) and checks the schema string."""

import base64
from collections.abc import Callable
from typing import TypeVar

import msgspec

from crypto.identity import Identity, KeyFormatError, PublicKey, strict_b64decode
from crypto.refusal import Refused, StructReason

S = TypeVar("S", bound=msgspec.Struct)


def canonical_bytes(struct: msgspec.Struct) -> bytes:
    """The bytes a signature covers: the struct's JSON without its `signature` field, keys sorted."""
    body = msgspec.to_builtins(struct)
    body.pop("signature", None)
    return msgspec.json.encode(body, order="sorted")


def normalized(struct: S) -> S:
    """`struct` after a strict JSON round trip (validates it; ints in float fields become floats), or ValueError."""
    try:
        return msgspec.json.decode(msgspec.json.encode(struct), type=type(struct))
    except (msgspec.ValidationError, msgspec.DecodeError, msgspec.EncodeError, TypeError) as exc:
        raise ValueError(f"{type(struct).__name__}: {exc}") from None


def sign_struct(identity: Identity, struct: S) -> S:
    """`struct` normalized and carrying `identity`'s signature over its canonical bytes."""
    unsigned = normalized(struct)
    signature = base64.b64encode(identity.sign(canonical_bytes(unsigned))).decode("ascii")
    return msgspec.structs.replace(unsigned, signature=signature)


def signature_valid(key_b64: str, signature_b64: str, struct: msgspec.Struct) -> bool:
    """True only if `signature_b64` is a valid signature of `struct`'s canonical bytes by the key `key_b64`."""
    try:
        public = PublicKey.from_b64(key_b64)
        signature = strict_b64decode(signature_b64)
    except (KeyFormatError, ValueError):
        return False
    return public.verify(signature, canonical_bytes(struct))


def key_fingerprint(key_b64: str) -> str | None:
    """The fingerprint of a base64 Ed25519 public key, or None if it is not one."""
    try:
        return PublicKey.from_b64(key_b64).fingerprint
    except KeyFormatError:
        return None


def decode_strict(
    data: bytes, kind: type[S], limit: int, schema: str | None, error: Callable[[str, str], Refused]
) -> S:
    """Size check (before decoding), strict JSON decode into `kind`, schema check (unless `schema` is None); a
    failure raises `error(reason, detail)` with a StructReason."""
    if len(data) > limit:
        raise error(StructReason.OVERSIZED, f"{kind.__name__} is {len(data)} bytes; the limit is {limit}")
    try:
        value = msgspec.json.decode(data, type=kind)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # invalid UTF-8; nesting too deep
        raise error(StructReason.MALFORMED, f"not a {kind.__name__}: {exc}") from None
    found = getattr(value, "schema", None)
    if schema is not None and found != schema:
        raise error(StructReason.SCHEMA, f"unknown schema {str(found)[:64]!r} (expected {schema})")
    return value
