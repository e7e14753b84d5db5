"""Content identifiers: unsigned varints, sha2-256 multihashes and CIDv0/CIDv1 (binary and string forms).

Strings: CIDv0 is base58btc without a prefix (`Qm…`); CIDv1 is written in multibase base32 lower (`b…`, as Kubo
prints it) and read from base32 (`b…`/`B…`) or base58btc (`z…`, as js-ipfs prints it). Equality is by bytes.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import base58

from crypto.refusal import SingleReason

RAW = 0x55
DAG_PB = 0x70
SHA2_256 = 0x12
SHA2_256_LEN = 32

CODEC_NAMES = {RAW: "raw", DAG_PB: "dag-pb"}
_MAX_VARINT_BYTES = 9  # multiformats: at most 63 bits
_B58_CHARS = frozenset(base58.BITCOIN_ALPHABET.decode("ascii"))


class CidError(SingleReason):
    """A malformed or unsupported CID, multihash or varint."""

    REASON = "bad_cid"


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128 varint of `value` (0 <= value < 2**63)."""
    if value < 0 or value >= 1 << 63:
        raise CidError(f"varint out of range: {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes | memoryview, offset: int = 0) -> tuple[int, int]:
    """Decode a minimal unsigned varint at `offset`; returns (value, offset after it)."""
    value = 0
    shift = 0
    for i in range(_MAX_VARINT_BYTES):
        pos = offset + i
        if pos >= len(buf):
            raise CidError(f"truncated varint at byte {offset}")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and i > 0:
                raise CidError(f"non-minimal varint at byte {offset}")
            return value, pos + 1
        shift += 7
    raise CidError(f"varint longer than {_MAX_VARINT_BYTES} bytes at byte {offset}")


def b58encode(data: bytes) -> str:
    """Bitcoin base58 (base58btc) of `data`."""
    return base58.b58encode(data).decode("ascii")


def b58decode(text: str) -> bytes:
    """Decode base58btc text; raises CidError on any character outside the alphabet (the `base58` package alone
    would also accept trailing whitespace: a second spelling of the same CID)."""
    if bad := set(text) - _B58_CHARS:
        raise CidError(f"invalid base58btc character {min(bad)!r} in {text!r}")
    return base58.b58decode(text)


def _b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _b32decode(text: str) -> bytes:
    upper = text.upper()
    try:
        return base64.b32decode(upper + "=" * (-len(upper) % 8))
    except ValueError as e:
        raise CidError(f"invalid base32 in {text!r}: {e}") from None


def multihash_sha256(data: bytes | memoryview) -> bytes:
    """The sha2-256 multihash of `data`."""
    return b"\x12\x20" + hashlib.sha256(data).digest()


def decode_multihash(mh: bytes) -> tuple[int, bytes]:
    """Split a complete multihash into (hash function code, digest); the length must match exactly."""
    code, pos = decode_varint(mh)
    length, pos = decode_varint(mh, pos)
    digest = mh[pos:]
    if len(digest) != length:
        raise CidError(f"multihash declares a {length}-byte digest but holds {len(digest)} bytes")
    if code == SHA2_256 and length != SHA2_256_LEN:
        raise CidError(f"sha2-256 multihash with a {length}-byte digest")
    return code, digest


@dataclass(frozen=True, slots=True)
class Cid:
    """A content identifier; two CIDs are equal when their binary forms are equal."""

    version: int
    codec: int
    multihash: bytes

    def __post_init__(self) -> None:
        if self.version not in (0, 1):
            raise CidError(f"unsupported CID version {self.version}")
        if self.version == 0 and self.codec != DAG_PB:
            raise CidError("CIDv0 is always dag-pb")
        code, _ = decode_multihash(self.multihash)
        if self.version == 0 and code != SHA2_256:
            raise CidError("CIDv0 is always sha2-256")

    @classmethod
    def v0(cls, multihash: bytes) -> Cid:
        """A CIDv0 (dag-pb, sha2-256) of a multihash."""
        return cls(0, DAG_PB, multihash)

    @classmethod
    def v1(cls, codec: int, multihash: bytes) -> Cid:
        """A CIDv1 of a codec and a multihash."""
        return cls(1, codec, multihash)

    @classmethod
    def decode(cls, data: bytes) -> Cid:
        """Parse the binary form (a bare sha2-256 multihash is CIDv0)."""
        data = bytes(data)
        if len(data) == 34 and data[0] == SHA2_256 and data[1] == SHA2_256_LEN:
            return cls.v0(data)
        if not data:
            raise CidError("empty CID")
        version, pos = decode_varint(data)
        if version != 1:
            raise CidError(f"unsupported CID version {version} (binary CID starts with {data[:4].hex()})")
        codec, pos = decode_varint(data, pos)
        return cls.v1(codec, data[pos:])

    @classmethod
    def parse(cls, text: str) -> Cid:
        """Parse a CID string: `Qm…` (v0), `b…`/`B…` (base32) or `z…` (base58btc) v1."""
        if not isinstance(text, str) or not text:
            raise CidError(f"not a CID: {text!r}")
        text = text.strip()
        if len(text) == 46 and text.startswith("Qm"):
            cid = cls.decode(b58decode(text))
            if cid.version != 0:
                raise CidError(f"{text!r} looks like CIDv0 but is not")
            return cid
        prefix, body = text[0], text[1:]
        if prefix in "bB":
            raw = _b32decode(body)
        elif prefix == "z":
            raw = b58decode(body)
        else:
            raise CidError(f"unsupported multibase prefix {prefix!r} in CID {text!r}")
        cid = cls.decode(raw)
        if cid.version == 0:
            raise CidError(f"CIDv0 must not carry a multibase prefix: {text!r}")
        return cid

    @classmethod
    def of(cls, value: str | bytes | Cid) -> Cid:
        """Coerce a CID, a CID string or binary CID into a Cid."""
        if isinstance(value, Cid):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        return cls.decode(value)

    @classmethod
    def for_block(cls, data: bytes | memoryview, codec: int, version: int = 1) -> Cid:
        """The sha2-256 CID of a block with the given codec and version."""
        mh = multihash_sha256(data)
        return cls(version, codec, mh)

    @property
    def hash_code(self) -> int:
        """The multihash function code (0x12 = sha2-256)."""
        return decode_varint(self.multihash)[0]

    @property
    def digest(self) -> bytes:
        """The hash digest inside the multihash."""
        return decode_multihash(self.multihash)[1]

    @property
    def codec_name(self) -> str:
        """The codec's multicodec name (or its hex code)."""
        return CODEC_NAMES.get(self.codec, hex(self.codec))

    def to_bytes(self) -> bytes:
        """The binary form."""
        if self.version == 0:
            return self.multihash
        return b"\x01" + encode_varint(self.codec) + self.multihash

    def encode(self, base: str = "base32") -> str:
        """The string form: base58btc for v0; base32 lower (`b…`) or base58btc (`z…`) for v1."""
        if self.version == 0:
            return b58encode(self.multihash)
        if base == "base32":
            return "b" + _b32encode(self.to_bytes())
        if base == "base58btc":
            return "z" + b58encode(self.to_bytes())
        raise CidError(f"unsupported multibase {base!r}")

    def to_v1(self) -> Cid:
        """The same content as CIDv1."""
        return Cid.v1(self.codec, self.multihash)

    def verify(self, data: bytes | memoryview) -> None:
        """Raise CidError unless `data` hashes to this CID's multihash."""
        if self.hash_code != SHA2_256:
            raise CidError(f"unsupported hash function 0x{self.hash_code:x} in {self}")
        if hashlib.sha256(data).digest() != self.multihash[2:]:
            raise CidError(f"block does not match its CID {self}")

    def __str__(self) -> str:
        return self.encode()

    def __repr__(self) -> str:
        return f"Cid({self.encode()!r})"
