"""CKKS homomorphic encryption (TenSEAL 0.3.18) for the additive aggregation of model updates.

Roles: every member of an HE federation holds the same `SecretContext` (it travels sealed to each member, see
crypto.sealing); the aggregator holds only a `PublicContext`, which is refused at load time if it carries a secret
key, so an aggregator can show that it cannot decrypt. Members encrypt their flat update vector, the aggregator
sums the ciphertexts (`add_encrypted`), members decrypt the sum.

Parameters (DESIGN §6): CKKS N=8192 (4096 slots per ciphertext), coefficient primes [60, 40], scale 2^40. A vector
is cut into 4096-value chunks, one ciphertext each (~131 KB: 1M values -> ~32 MB). Values are approximate (error
~1e-7 here) and bounded: the sum of up to 2^SUM_HEADROOM_BITS encrypted vectors must stay below the data modulus,
so `encrypt_vector` refuses |x| > `HEParams.max_abs_value` (512 for the defaults).

The public context is serialized with the public key only: no secret, galois or relinearization keys (sums need
none of them): ~235 KB instead of the ~470 KB TenSEAL writes by default.

Wire form of an `EncryptedVector` (big-endian):
    header  magic b"MRHE" | version u8 (1) | key_id 16 bytes | length u64 | chunk_count u32
    chunks  chunk_count x (size u32 | TenSEAL CKKSVector bytes)
    trailer sha256(header + chunks), 32 bytes
`key_id` is the first 16 bytes of sha256 of the public context bytes: a vector is only read by, added to, and
decrypted with the context of the key it was encrypted under (TenSEAL would silently produce garbage instead).
The digest only detects corruption; authenticity comes from the signed envelopes and framed streams around it.
"""

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts

from crypto.refusal import SingleReason

MAGIC = b"MRHE"
VERSION = 1
KEY_ID_SIZE = 16
SUM_HEADROOM_BITS = 10
MAX_SUMMANDS = 2**SUM_HEADROOM_BITS
MAX_PUBLIC_CONTEXT_BYTES = 4 * 1024 * 1024
MAX_SECRET_CONTEXT_BYTES = 4 * 1024 * 1024
MAX_VECTOR_BYTES = 256 * 1024 * 1024

_HEADER = struct.Struct(">4sB16sQI")
_CHUNK_SIZE = struct.Struct(">I")
_DIGEST_SIZE = 32
_POLY_MODULUS_DEGREES = (4096, 8192, 16384, 32768)
# SEAL's largest total coefficient modulus for 128-bit security (CoeffModulus::MaxBitCount).
_MAX_COEFF_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
_MIN_PRIME_BITS, _MAX_PRIME_BITS = 20, 60
_MIN_SCALE_BITS = 20
_FRESH_CIPHERTEXT_POLYS = 2


class HEError(ValueError):
    """A homomorphic-encryption operation that cannot be done; the message says what is wrong."""


class HEParamsError(HEError):
    """CKKS parameters that are invalid, insecure, or not the ones expected."""


class HEFormatError(SingleReason, HEError):
    """Bytes that are not an acceptable serialized context or encrypted vector."""

    REASON = "bad_ciphertext"


class HEKeyError(HEError):
    """A key problem: a secret key where none may be, none where one is needed, or vectors of another key."""


class HEShapeError(HEError):
    """Vectors whose lengths or chunking do not match."""


@dataclass(frozen=True)
class HEParams:
    """CKKS parameters: ring degree N, coefficient prime sizes (the last is the special prime), scale 2^bits."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    global_scale_bits: int = 40

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        _check_params(self)

    @property
    def slots(self) -> int:
        """Values per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives in (every prime but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def max_abs_value(self) -> float:
        """Largest |value| `encrypt_vector` accepts, so that a sum of MAX_SUMMANDS vectors still decrypts."""
        return 2.0 ** (self.data_modulus_bits - 1 - self.global_scale_bits - SUM_HEADROOM_BITS)


def _check_params(params: HEParams) -> None:
    """Raise HEParamsError unless `params` are usable, 128-bit secure CKKS parameters."""
    n, bits, scale = params.poly_modulus_degree, params.coeff_mod_bit_sizes, params.global_scale_bits
    if n not in _POLY_MODULUS_DEGREES:
        raise HEParamsError(f"poly_modulus_degree must be one of {_POLY_MODULUS_DEGREES}, got {n}")
    if len(bits) < 2 or not all(isinstance(b, int) and _MIN_PRIME_BITS <= b <= _MAX_PRIME_BITS for b in bits):
        raise HEParamsError(
            f"coeff_mod_bit_sizes must be at least 2 integers in [{_MIN_PRIME_BITS}, {_MAX_PRIME_BITS}], got {bits}"
        )
    if sum(bits) > _MAX_COEFF_BITS_128[n]:
        raise HEParamsError(
            f"coefficient modulus of {sum(bits)} bits exceeds {_MAX_COEFF_BITS_128[n]} bits, the 128-bit security "
            f"limit for N={n}"
        )
    if not isinstance(scale, int) or scale < _MIN_SCALE_BITS:
        raise HEParamsError(f"global_scale_bits must be an integer >= {_MIN_SCALE_BITS}, got {scale}")
    if params.max_abs_value < 1.0:
        raise HEParamsError(
            f"global_scale_bits={scale} leaves no room for values: the data modulus has {params.data_modulus_bits} "
            f"bits and sums of {MAX_SUMMANDS} vectors need {SUM_HEADROOM_BITS} more"
        )


def _params_of(ctx: Any) -> HEParams:
    """Read the CKKS parameters a TenSEAL context was made with (the prime sizes from the modulus chain)."""
    seal = ctx.seal_context().data
    key_level = seal.key_context_data()
    if key_level.parms().scheme() != ts.SCHEME_TYPE.CKKS.value:
        raise HEParamsError(f"not a CKKS context: scheme {key_level.parms().scheme()}")
    totals = []
    level = key_level
    while level is not None:
        totals.append(int(level.total_coeff_modulus_bit_count()))
        level = level.next_context_data()
    bits = [totals[-1]] + [totals[i - 1] - totals[i] for i in range(len(totals) - 1, 0, -1)]
    try:
        scale = float(ctx.global_scale)
    except ValueError as exc:
        raise HEParamsError("the context has no global scale") from exc
    scale_bits = math.log2(scale) if scale > 0 else -1.0
    if not scale_bits.is_integer():
        raise HEParamsError(f"the context's global scale {scale} is not a power of two")
    return HEParams(int(key_level.parms().poly_modulus_degree()), tuple(bits), int(scale_bits))


def _public_bytes_of(ctx: Any) -> bytes:
    """Serialize a context with its public key only (no secret, galois or relinearization keys)."""
    return bytes(
        ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    )


def _load_context(data: bytes, max_bytes: int, what: str) -> Any:
    """Parse TenSEAL context bytes after a size check; raise HEFormatError with `what` in the message."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise HEFormatError(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise HEFormatError(f"{what} is {len(data)} bytes, more than the limit of {max_bytes}")
    try:
        return ts.context_from(bytes(data))
    except Exception as exc:  # TenSEAL raises ValueError, RuntimeError, IndexError... for bad bytes
        raise HEFormatError(f"{what} is not a serialized TenSEAL context: {exc}") from exc


class _Context:
    """A TenSEAL CKKS context with its parameters and key id."""

    def __init__(self, ctx: Any, expected: HEParams | None = None) -> None:
        self._ctx = ctx
        self.params: HEParams = _params_of(ctx)
        if expected is not None and self.params != expected:
            raise HEParamsError(f"the context uses {self.params}, expected {expected}")
        if not ctx.has_public_key():
            raise HEKeyError("the context holds no public key: it cannot encrypt")
        self._public_bytes = _public_bytes_of(ctx)
        self.key_id: bytes = hashlib.sha256(self._public_bytes).digest()[:KEY_ID_SIZE]

    @property
    def tenseal(self) -> Any:
        """The wrapped tenseal.Context."""
        return self._ctx

    @property
    def has_secret_key(self) -> bool:
        """True if this context can decrypt."""
        return bool(self._ctx.is_private())

    def public_bytes(self) -> bytes:
        """The context with its public key only: what an aggregator receives (no secret, galois, relin keys)."""
        return self._public_bytes


class PublicContext(_Context):
    """A context without a secret key: it can encrypt, read and add vectors, never decrypt (the aggregator's)."""

    def __init__(self, ctx: Any, expected: HEParams | None = None) -> None:
        if ctx.is_private():
            raise HEKeyError("a public context must not hold a secret key")
        super().__init__(ctx, expected)

    @classmethod
    def from_bytes(
        cls, data: bytes, max_bytes: int = MAX_PUBLIC_CONTEXT_BYTES, params: HEParams | None = None
    ) -> "PublicContext":
        """Load a public context; refuse one that carries a secret key, or other parameters than `params`."""
        ctx = _load_context(data, max_bytes, "public context")
        if ctx.is_private():
            raise HEKeyError("refusing a public context that carries a secret key")
        return cls(ctx, params)


class SecretContext(_Context):
    """A context with the secret key shared by the members of an HE federation: it encrypts and decrypts."""

    def __init__(self, ctx: Any, expected: HEParams | None = None) -> None:
        if not ctx.is_private():
            raise HEKeyError("a secret context must hold the secret key")
        super().__init__(ctx, expected)

    @classmethod
    def generate(cls, params: HEParams | None = None) -> "SecretContext":
        """Create a fresh CKKS key set (secret and public key) for `params` (default HEParams())."""
        params = params or HEParams()
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree, -1, list(params.coeff_mod_bit_sizes))
        ctx.global_scale = 2.0**params.global_scale_bits
        return cls(ctx, params)

    @classmethod
    def from_bytes(
        cls, data: bytes, max_bytes: int = MAX_SECRET_CONTEXT_BYTES, params: HEParams | None = None
    ) -> "SecretContext":
        """Load a context serialized by `serialize`; refuse one without its secret key."""
        ctx = _load_context(data, max_bytes, "secret context")
        if not ctx.is_private():
            raise HEKeyError("the context bytes carry no secret key")
        return cls(ctx, params)

    def serialize(self) -> bytes:
        """The context WITH its secret key and public key (seal it before it leaves the node)."""
        return bytes(
            self._ctx.serialize(
                save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
            )
        )

    def public(self) -> PublicContext:
        """The public-only counterpart of this context."""
        return PublicContext.from_bytes(self._public_bytes, params=self.params)


HEContext = SecretContext | PublicContext


@dataclass(frozen=True, eq=False)
class EncryptedVector:
    """A float vector of `length` values encrypted chunk by chunk (params.slots values per CKKS ciphertext)."""

    length: int
    key_id: bytes
    params: HEParams
    chunks: tuple[Any, ...]

    @property
    def chunk_count(self) -> int:
        """Number of ciphertexts."""
        return len(self.chunks)

    def serialize(self) -> bytes:
        """Header, length-prefixed TenSEAL chunks, sha256 trailer (see the module docstring)."""
        parts = [_HEADER.pack(MAGIC, VERSION, self.key_id, self.length, len(self.chunks))]
        for chunk in self.chunks:
            data = chunk.serialize()
            parts += [_CHUNK_SIZE.pack(len(data)), data]
        body = b"".join(parts)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def deserialize(cls, ctx: HEContext, data: bytes, max_bytes: int = MAX_VECTOR_BYTES) -> "EncryptedVector":
        """Parse bytes made by `serialize` for the key of `ctx`; refuse anything malformed or mismatched."""
        length, count = _check_envelope(ctx, data, max_bytes)
        view = memoryview(data)
        offset = _HEADER.size
        end = len(data) - _DIGEST_SIZE
        chunks = []
        for index in range(count):
            expected_size = min(ctx.params.slots, length - index * ctx.params.slots)
            chunk, offset = _read_chunk(ctx, view, offset, end, index, expected_size)
            chunks.append(chunk)
        if offset != end:
            raise HEFormatError(f"{end - offset} unexpected bytes after the last chunk")
        return cls(length, ctx.key_id, ctx.params, tuple(chunks))


def _chunk_count(length: int, slots: int) -> int:
    """Number of ciphertexts for `length` values."""
    return -(-length // slots)


def _check_envelope(ctx: HEContext, data: bytes, max_bytes: int) -> tuple[int, int]:
    """Check size, header and digest of serialized vector bytes; return (length, chunk count)."""
    if not isinstance(data, bytes | bytearray):
        raise HEFormatError(f"encrypted vector must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise HEFormatError(f"encrypted vector is {len(data)} bytes, more than the limit of {max_bytes}")
    if len(data) < _HEADER.size + _DIGEST_SIZE:
        raise HEFormatError(f"encrypted vector truncated: {len(data)} bytes, shorter than header and digest")
    magic, version, key_id, length, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise HEFormatError(f"not an encrypted vector: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise HEFormatError(f"unsupported encrypted vector version {version}, expected {VERSION}")
    if key_id != ctx.key_id:
        raise HEKeyError(f"vector encrypted under key {key_id.hex()}, this context's key is {ctx.key_id.hex()}")
    if length < 1 or count != _chunk_count(length, ctx.params.slots):
        raise HEFormatError(
            f"header says {length} values in {count} chunks; {ctx.params.slots} values per chunk need "
            f"{_chunk_count(length, ctx.params.slots)}"
        )
    if count * _CHUNK_SIZE.size > len(data):
        raise HEFormatError(f"encrypted vector truncated: {len(data)} bytes cannot hold {count} chunks")
    body, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != digest:
        raise HEFormatError("encrypted vector digest mismatch: the bytes are corrupted or truncated")
    return length, count


def _read_chunk(
    ctx: HEContext, view: memoryview, offset: int, end: int, index: int, expected_size: int
) -> tuple[Any, int]:
    """Read chunk `index` at `offset`; return it and the offset after it."""
    if offset + _CHUNK_SIZE.size > end:
        raise HEFormatError(f"chunk {index}: truncated before its size field")
    (size,) = _CHUNK_SIZE.unpack_from(view, offset)
    offset += _CHUNK_SIZE.size
    if size > end - offset:
        raise HEFormatError(f"chunk {index}: {size} bytes announced, only {end - offset} left")
    try:
        chunk = ts.ckks_vector_from(ctx.tenseal, bytes(view[offset : offset + size]))
    except Exception as exc:  # TenSEAL raises ValueError, RuntimeError, IndexError... for bad bytes
        raise HEFormatError(f"chunk {index}: not a CKKS vector for this context: {exc}") from exc
    _check_chunk(ctx.params, chunk, index, expected_size)
    return chunk, offset + size


def _check_chunk(params: HEParams, chunk: Any, index: int, expected_size: int) -> None:
    """Refuse a chunk whose slot count, scale, level or ciphertext size is not that of a fresh encryption."""
    if chunk.size() != expected_size:
        raise HEFormatError(f"chunk {index}: holds {chunk.size()} values, expected {expected_size}")
    ciphertexts = chunk.ciphertext()
    if len(ciphertexts) != 1:
        raise HEFormatError(f"chunk {index}: holds {len(ciphertexts)} ciphertexts, expected 1")
    ct = ciphertexts[0]
    if ct.scale != 2.0**params.global_scale_bits:
        raise HEFormatError(f"chunk {index}: scale {ct.scale}, expected 2^{params.global_scale_bits}")
    levels = len(params.coeff_mod_bit_sizes) - 1
    if ct.size() != _FRESH_CIPHERTEXT_POLYS or ct.coeff_modulus_size() != levels or not ct.is_ntt_form():
        raise HEFormatError(
            f"chunk {index}: ciphertext of {ct.size()} polynomials over {ct.coeff_modulus_size()} primes, expected "
            f"{_FRESH_CIPHERTEXT_POLYS} over {levels} (NTT form)"
        )


def _as_vector(vector: np.ndarray, params: HEParams) -> np.ndarray:
    """Check that `vector` is a non-empty, finite, 1-D float vector within range; return it as float64."""
    array = np.asarray(vector)
    if array.ndim != 1 or array.size == 0:
        raise HEShapeError(f"expected a non-empty 1-D vector, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise HEError(f"expected a float vector, got dtype {array.dtype}")
    values = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(values)):
        raise HEError(f"the vector holds a NaN or infinite value at index {int(np.argmin(np.isfinite(values)))}")
    peak = int(np.argmax(np.abs(values)))
    if abs(values[peak]) > params.max_abs_value:
        raise HEError(
            f"value {values[peak]} at index {peak} is out of range: |x| <= {params.max_abs_value} is supported"
        )
    return values


def encrypt_vector(ctx: HEContext, vector: np.ndarray) -> EncryptedVector:
    """Encrypt a 1-D float vector, params.slots values per ciphertext (a public or secret context will do)."""
    values = _as_vector(vector, ctx.params)
    slots = ctx.params.slots
    chunks = tuple(ts.ckks_vector(ctx.tenseal, values[i : i + slots].tolist()) for i in range(0, len(values), slots))
    return EncryptedVector(len(values), ctx.key_id, ctx.params, chunks)


def _check_summable(vectors: Sequence[EncryptedVector]) -> EncryptedVector:
    """Raise unless `vectors` can be added; return the first."""
    if not vectors:
        raise HEShapeError("nothing to add: no encrypted vectors")
    if len(vectors) > MAX_SUMMANDS:
        raise HEShapeError(f"{len(vectors)} vectors: at most {MAX_SUMMANDS} can be summed without overflow")
    first = vectors[0]
    for i, other in enumerate(vectors[1:], start=1):
        if other.key_id != first.key_id or other.params != first.params:
            raise HEKeyError(f"vector {i} is encrypted under another key or parameters than vector 0")
        if other.length != first.length or other.chunk_count != first.chunk_count:
            raise HEShapeError(
                f"vector {i} has {other.length} values in {other.chunk_count} chunks, vector 0 has "
                f"{first.length} in {first.chunk_count}"
            )
    return first


def add_encrypted(vectors: Sequence[EncryptedVector]) -> EncryptedVector:
    """Element-wise sum of encrypted vectors of the same key and length (no key needed)."""
    first = _check_summable(vectors)
    if len(vectors) == 1:
        return first
    # `a + b` makes a new ciphertext in ~20 µs; CKKSVector.copy() takes ~6 ms (it round-trips through bytes).
    sums = [a + b for a, b in zip(first.chunks, vectors[1].chunks, strict=True)]
    for other in vectors[2:]:
        for total, chunk in zip(sums, other.chunks, strict=True):
            total.add_(chunk)
    return EncryptedVector(first.length, first.key_id, first.params, tuple(sums))


def decrypt_vector(secret_ctx: SecretContext, enc: EncryptedVector, dtype: type = np.float64) -> np.ndarray:
    """Decrypt to a 1-D array of `dtype` (float64 or float32); needs the secret context of the vector's key."""
    if not isinstance(secret_ctx, SecretContext) or not secret_ctx.has_secret_key:
        raise HEKeyError(f"decryption needs the secret context; got a {type(secret_ctx).__name__} without a secret key")
    if enc.key_id != secret_ctx.key_id:
        raise HEKeyError(f"vector encrypted under key {enc.key_id.hex()}, the secret key is {secret_ctx.key_id.hex()}")
    if np.dtype(dtype) not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise HEError(f"dtype must be float64 or float32, got {np.dtype(dtype)}")
    secret_key = secret_ctx.tenseal.secret_key()
    parts = [np.asarray(chunk.decrypt(secret_key), dtype=np.float64) for chunk in enc.chunks]
    result = np.concatenate(parts)
    if result.shape != (enc.length,):
        raise HEShapeError(f"decrypted {result.shape[0]} values, expected {enc.length}")
    return result.astype(dtype, copy=False)
