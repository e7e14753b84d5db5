"""The federation descriptor, its invite tokens and join requests: small JSON structs signed with Ed25519.

A descriptor is written once by its creator and stored in the DHT under `descriptor_key(name, creator)`. It fixes
what every round of the federation must agree on: the base model, the LoRA shape, the privacy mode and its
parameters, the aggregation strategy, quorum, deadline, per-node epsilon budget and admission policy. Its
`federation_id` is the sha256 of its canonical signed bytes, so it names exactly one set of rules.

Every signed struct here (and in federation.messages) follows one pattern: the signature is standard base64 of an
Ed25519 signature over `canonical_bytes(struct)` (the JSON of every other field, keys sorted). The signer
normalizes the struct by a strict encode/decode round trip before signing, so what it signs is exactly what a
verifier recomputes after decoding. Verifiers check the size before decoding, decode strictly (unknown fields,
wrong types and out-of-range values refused), check the schema, then the key and signature, then the semantics.
"""

import base64
import hashlib
import math
import secrets
import time
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from crypto.identity import Identity, strict_b64decode
from crypto.refusal import Refused
from crypto.signed import canonical_bytes, decode_strict, key_fingerprint, sign_struct, signature_valid
from federation.strategies import allowed_in_mode, make_strategy
from federation.strategies.base import AggregationError
from marketplace.manifest import NAME_RE

SCHEMA = "mirador.federation/v1"
INVITE_SCHEMA = "mirador.invite/v1"
JOIN_SCHEMA = "mirador.join/v1"
ADMISSION_SCHEMA = "mirador.fed.admission/v1"
MAX_ADMISSION_BYTES = 2048
KEY_PREFIX = "/mirador-fed/"
MAX_DHT_KEY_BYTES = 50
KEY_DIGITS = MAX_DHT_KEY_BYTES - len(KEY_PREFIX)
MAX_DESCRIPTOR_BYTES = 8 * 1024
MAX_INVITE_BYTES = 1024
MAX_JOIN_BYTES = 4 * 1024
MAX_JOIN_SKEW_S = 600
HE_MAX_COEFF_BITS = {8192: 218, 16384: 438}  # SEAL's 128-bit security bound on the sum of the coefficient moduli
ANY_INVITEE = "*"

Fingerprint = Annotated[str, msgspec.Meta(pattern=r"^ed25519:[0-9a-f]{32}$")]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
KeyB64 = Annotated[str, msgspec.Meta(min_length=44, max_length=44)]
SignatureB64 = Annotated[str, msgspec.Meta(max_length=88)]
UnixTime = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
ModuleName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")]
ParamName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
StrategyName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
PrivacyMode = Literal["dp", "he", "he+dp", "dp-user", "he+dp-user"]
UpdateEncoding = Literal["f32", "q8"]
Admission = Literal["open", "invite"]

S = TypeVar("S", bound=msgspec.Struct)


class FederationReason(StrEnum):
    """Why a descriptor, invite token or join request was refused."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    SCHEMA = "schema"
    KEY_MISMATCH = "key_mismatch"
    BAD_SIGNATURE = "bad_signature"
    INCONSISTENT = "inconsistent"
    WRONG_DHT_KEY = "wrong_dht_key"
    NOT_CREATOR = "not_creator"
    OTHER_FEDERATION = "other_federation"
    EXPIRED = "expired"
    OTHER_INVITEE = "other_invitee"
    INVITE_REQUIRED = "invite_required"
    STALE = "stale"


class FederationRefused(Refused):
    """Base of the refusals here: `reason` (a FederationReason) and a detail naming what is wrong."""

    REASONS = FederationReason
    reason: FederationReason


class DescriptorError(FederationRefused):
    """A federation descriptor refused (or one that cannot be signed)."""


class InviteError(FederationRefused):
    """An invite token refused."""


class JoinError(FederationRefused):
    """A join request refused (an invite problem keeps the invite's reason)."""


# --- the descriptor ---------------------------------------------------------------------------------------------


class AdapterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True, omit_defaults=True):
    """The LoRA every member trains: rank, alpha and the target modules (sorted, unique).

    `freeze_a` is FFA-LoRA (Sun et al., ICLR 2024, https://arxiv.org/abs/2403.12313): every lora_A stays at the
    initialisation seeded by the federation id, only lora_B is trained and aggregated, so the mean of the members'
    B·A products is exactly the aggregate's B·A (averaging A and B separately is not), DP-SGD clips and noises half
    the dimensions, and an update is half the bytes. Omitted from the signed bytes when false, so descriptors signed
    before the field existed keep their signatures (and their A+B meaning)."""

    rank: Annotated[int, msgspec.Meta(ge=1, le=256)]
    alpha: Annotated[float, msgspec.Meta(gt=0, le=4096)]
    targets: Annotated[tuple[ModuleName, ...], msgspec.Meta(min_length=1, max_length=64)]
    freeze_a: bool = False


class LocalDpSgd(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Optional DP-SGD on each member's own data (opacus), on top of the federation's update privacy."""

    epsilon: Annotated[float, msgspec.Meta(gt=0, le=1000)]
    delta: Annotated[float, msgspec.Meta(gt=0, lt=1)]
    max_grad_norm: Annotated[float, msgspec.Meta(gt=0, le=1e6)]


class DpParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Update privacy: clip each update to L2 norm `clip_norm`, add Gaussian noise of std `noise_multiplier * C`."""

    clip_norm: Annotated[float, msgspec.Meta(gt=0, le=1e6)]
    noise_multiplier: Annotated[float, msgspec.Meta(ge=0, le=1000)]
    delta: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 1e-5
    local_dp_sgd: LocalDpSgd | None = None


class HeParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """CKKS parameters (TenSEAL): ring degree, coefficient modulus bit sizes, scale 2**global_scale_bits."""

    poly_modulus_degree: Literal[8192, 16384] = 8192
    coeff_mod_bit_sizes: Annotated[
        tuple[Annotated[int, msgspec.Meta(ge=20, le=60)], ...], msgspec.Meta(min_length=2, max_length=16)
    ] = (60, 40)
    global_scale_bits: Annotated[int, msgspec.Meta(ge=20, le=60)] = 40


class Privacy(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The privacy mode and its parameters (`he` is required exactly when the mode contains 'he')."""

    mode: PrivacyMode
    dp: DpParams
    he: HeParams | None = None


class StrategySpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """An aggregation strategy by name with its numeric parameters (checked by federation.strategies)."""

    name: StrategyName = "fedavg"
    params: Annotated[dict[ParamName, int | float], msgspec.Meta(max_length=32)] = msgspec.field(default_factory=dict)


class FederationDescriptor(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True, omit_defaults=True):
    """A federation's rules, signed by its creator; `signature` covers the canonical bytes of every other field.

    `update_encoding` "q8" sends plain updates as 8-bit codes with a scale per tensor (federation.quantize), a
    quarter of the bytes; "f32" (the default) as float32. Omitted from the signed bytes when "f32", so descriptors
    signed before the field existed keep their signatures; a node that predates it refuses a "q8" descriptor as
    malformed instead of sending updates the aggregator would refuse."""

    schema: str
    name: Annotated[str, msgspec.Meta(pattern=NAME_RE)]
    creator: Fingerprint
    creator_key: KeyB64
    created: UnixTime
    base_sha256: Sha256Hex
    adapter: AdapterConfig
    privacy: Privacy
    strategy: StrategySpec
    quorum: Annotated[int, msgspec.Meta(ge=2, le=10_000)]
    min_members: Annotated[int, msgspec.Meta(ge=2, le=10_000)]
    round_deadline_s: Annotated[int, msgspec.Meta(gt=0, le=7 * 24 * 3600)]
    local_steps: Annotated[int, msgspec.Meta(ge=1, le=10_000)]
    epsilon_budget: Annotated[float, msgspec.Meta(gt=0, le=1e6)]
    admission: Admission
    update_encoding: UpdateEncoding = "f32"
    signature: SignatureB64 = ""

    def signed_bytes(self) -> bytes:
        """The canonical bytes the creator's signature covers."""
        return canonical_bytes(self)

    @property
    def federation_id(self) -> str:
        """The stable id of the federation: hex sha256 of the canonical signed bytes."""
        return hashlib.sha256(self.signed_bytes()).hexdigest()

    @property
    def uses_he(self) -> bool:
        """True if updates are CKKS-encrypted (mode 'he' or 'he+dp')."""
        return "he" in self.privacy.mode

    @property
    def uses_dp(self) -> bool:
        """True if what is released is differentially private (every mode but 'he')."""
        return "dp" in self.privacy.mode

    @property
    def example_level(self) -> bool:
        """True if members train with DP-SGD ('dp', 'he+dp'): the unit of privacy is one training example, clipped
        per example to C, noised with z, Poisson-sampled; the released update is post-processing of that run."""
        return self.uses_dp and not self.user_level

    @property
    def user_level(self) -> bool:
        """True if the unit of privacy is a member's whole update ('dp-user', 'he+dp-user'): the update is clipped and
        noised once per round, which only large federations can afford."""
        return self.privacy.mode.endswith("-user")


def descriptor_key(name: str, creator: str) -> str:
    """The DHT key of federation `name` by `creator`: '/mirador-fed/' + 37 hex digits of sha256('<name>/<creator>').

    50 bytes in all: py-libp2p 0.8.1 walks FIND_NODE targets that are not multihashes only up to 50 bytes, and the
    13-byte prefix leaves room for 37 hex digits (148 bits), not 40. The node registers a validator for the
    'mirador-fed' namespace that calls `verify_descriptor(value, key)`.
    """
    digest = hashlib.sha256(f"{name}/{creator}".encode()).hexdigest()[:KEY_DIGITS]
    return f"{KEY_PREFIX}{digest}"


def check_consistency(descriptor: FederationDescriptor) -> None:
    """Semantic checks the field constraints cannot express; raise DescriptorError(INCONSISTENT) naming the field."""

    def bad(detail: str) -> DescriptorError:
        return DescriptorError(FederationReason.INCONSISTENT, detail)

    targets = descriptor.adapter.targets
    if len(set(targets)) != len(targets):
        raise bad(f"adapter.targets: a module is listed twice: {list(targets)}")
    if list(targets) != sorted(targets):
        raise bad(f"adapter.targets: not sorted: {list(targets)}")
    if descriptor.min_members < descriptor.quorum:
        raise bad(f"min_members ({descriptor.min_members}) is below the quorum ({descriptor.quorum})")
    privacy = descriptor.privacy
    if descriptor.uses_dp and privacy.dp.noise_multiplier <= 0:
        raise bad(f"privacy.dp.noise_multiplier must be > 0 in mode {privacy.mode!r}")
    if descriptor.example_level and privacy.dp.local_dp_sgd is not None:
        raise bad(f"privacy.dp.local_dp_sgd: mode {privacy.mode!r} trains with DP-SGD at the federation's z and C")
    if descriptor.uses_he:
        if privacy.he is None:
            raise bad(f"privacy.he is required in mode {privacy.mode!r}")
        _check_he(privacy.he)
    elif privacy.he is not None:
        raise bad(f"privacy.he given in mode {privacy.mode!r} (no encryption)")
    if descriptor.update_encoding != "f32" and descriptor.uses_he:
        raise bad(f"update_encoding {descriptor.update_encoding!r}: mode {privacy.mode!r} sends CKKS ciphertexts")
    try:
        make_strategy(descriptor.strategy.name, **descriptor.strategy.params)
        allowed = allowed_in_mode(descriptor.strategy.name, privacy.mode)
    except AggregationError as exc:
        raise bad(f"strategy: {exc}") from None
    if not allowed:
        raise bad(f"strategy {descriptor.strategy.name!r} cannot run on CKKS ciphertexts (only fedavg)")
    for key, value in descriptor.strategy.params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(f"strategy.params.{key} is not finite")


def _check_he(he: HeParams) -> None:
    bits = he.coeff_mod_bit_sizes
    limit = HE_MAX_COEFF_BITS[he.poly_modulus_degree]
    if sum(bits) > limit:
        raise DescriptorError(
            FederationReason.INCONSISTENT,
            f"privacy.he.coeff_mod_bit_sizes sum to {sum(bits)} bits; N={he.poly_modulus_degree} allows {limit}",
        )
    if he.global_scale_bits >= bits[0]:
        raise DescriptorError(
            FederationReason.INCONSISTENT,
            f"privacy.he.global_scale_bits ({he.global_scale_bits}) leaves no headroom below the first modulus "
            f"({bits[0]} bits)",
        )


def sign_descriptor(
    identity: Identity,
    *,
    name: str,
    base_sha256: str,
    adapter: AdapterConfig,
    privacy: Privacy,
    strategy: StrategySpec | None = None,
    quorum: int = 2,
    min_members: int = 2,
    round_deadline_s: int = 600,
    local_steps: int = 50,
    epsilon_budget: float = 8.0,
    admission: Admission = "open",
    created: int | None = None,
    update_encoding: UpdateEncoding = "f32",
) -> bytes:
    """A descriptor (JSON bytes) created and signed by `identity`; DescriptorError if it would not verify."""
    draft = FederationDescriptor(
        schema=SCHEMA,
        name=name,
        creator=identity.fingerprint,
        creator_key=identity.public_key_b64(),
        created=int(time.time()) if created is None else created,
        base_sha256=base_sha256,
        adapter=msgspec.structs.replace(adapter, targets=tuple(sorted(adapter.targets))),
        privacy=privacy,
        strategy=strategy or StrategySpec(),
        quorum=quorum,
        min_members=min_members,
        round_deadline_s=round_deadline_s,
        local_steps=local_steps,
        epsilon_budget=epsilon_budget,
        admission=admission,
        update_encoding=update_encoding,
    )
    try:
        signed = sign_struct(identity, draft)
    except ValueError as exc:
        raise DescriptorError(FederationReason.MALFORMED, str(exc)) from None
    check_consistency(signed)
    return msgspec.json.encode(signed)


def verify_descriptor(data: bytes, key: str | None = None) -> FederationDescriptor:
    """Decode and verify a descriptor (and, if `key` is given, that it is stored under its own DHT key)."""
    descriptor = decode_strict(data, FederationDescriptor, MAX_DESCRIPTOR_BYTES, SCHEMA, DescriptorError)
    if key is not None and key != descriptor_key(descriptor.name, descriptor.creator):
        raise DescriptorError(FederationReason.WRONG_DHT_KEY, f"key {key[:80]!r} does not name this descriptor")
    found = key_fingerprint(descriptor.creator_key)
    if found != descriptor.creator:
        raise DescriptorError(
            FederationReason.KEY_MISMATCH, f"creator_key is {found}, not the creator {descriptor.creator}"
        )
    if not signature_valid(descriptor.creator_key, descriptor.signature, descriptor):
        raise DescriptorError(FederationReason.BAD_SIGNATURE, "the creator's signature does not match the descriptor")
    check_consistency(descriptor)
    return descriptor


# --- invite tokens ----------------------------------------------------------------------------------------------


class InviteToken(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Admission to one federation, signed by its creator, for one invitee (or anyone holding it: '*').

    The nonce lets the membership layer refuse a second use of a bearer token; `check_invite` itself is stateless.
    """

    schema: str
    federation_id: Sha256Hex
    invitee: Annotated[str, msgspec.Meta(pattern=r"^(\*|ed25519:[0-9a-f]{32})$")]
    expires: UnixTime
    nonce: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
    signature: SignatureB64 = ""


def issue_invite(identity: Identity, federation_id: str, invitee: str, ttl_s: int, now: float | None = None) -> bytes:
    """An invite token (JSON bytes) signed by `identity` (the creator) for `invitee` ('*' for a bearer token)."""
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    token = InviteToken(
        schema=INVITE_SCHEMA,
        federation_id=federation_id,
        invitee=invitee,
        expires=int(time.time() if now is None else now) + ttl_s,
        nonce=secrets.token_hex(16),
    )
    return msgspec.json.encode(sign_struct(identity, token))


def check_invite(
    descriptor: FederationDescriptor, token_bytes: bytes, joiner_fingerprint: str, now: float | None = None
) -> InviteToken:
    """The token if it admits `joiner_fingerprint` to `descriptor`'s federation at `now`; else InviteError."""
    token = decode_strict(token_bytes, InviteToken, MAX_INVITE_BYTES, INVITE_SCHEMA, InviteError)
    if not signature_valid(descriptor.creator_key, token.signature, token):
        raise InviteError(FederationReason.NOT_CREATOR, f"the token is not signed by the creator {descriptor.creator}")
    if token.federation_id != descriptor.federation_id:
        raise InviteError(FederationReason.OTHER_FEDERATION, f"the token is for federation {token.federation_id[:16]}…")
    if token.expires < (time.time() if now is None else now):
        raise InviteError(FederationReason.EXPIRED, f"the token expired at {token.expires}")
    if token.invitee not in (ANY_INVITEE, joiner_fingerprint):
        raise InviteError(FederationReason.OTHER_INVITEE, f"the token is for {token.invitee}, not {joiner_fingerprint}")
    return token


# --- join requests ----------------------------------------------------------------------------------------------


Role = Literal["member", "aggregator"]


class JoinRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A node asks to join: its Ed25519 identity, its X25519 key (for sealed secrets), an optional invite token."""

    schema: str
    federation_id: Sha256Hex
    joiner: Fingerprint
    key: KeyB64
    x25519: KeyB64
    role: Role = "member"
    invite: Annotated[str, msgspec.Meta(max_length=(MAX_INVITE_BYTES + 2) // 3 * 4)] = ""
    time: UnixTime
    signature: SignatureB64 = ""


class Member(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """An admitted member: fingerprint, Ed25519 key, X25519 key (base64), when it joined, the invite nonce used."""

    fingerprint: Fingerprint
    key: KeyB64
    x25519: KeyB64
    joined: UnixTime
    role: Role = "member"
    invite_nonce: Annotated[str, msgspec.Meta(max_length=32)] = ""


def sign_join(
    identity: Identity,
    federation_id: str,
    x25519_b64: str,
    invite: bytes | None = None,
    now: float | None = None,
    role: str = "member",
) -> bytes:
    """A join request (JSON bytes) signed by `identity`, carrying its X25519 public key and an optional invite.

    `role` "aggregator" asks to aggregate only: under HE such a node gets the public context, never the secret one.
    """
    request = JoinRequest(
        schema=JOIN_SCHEMA,
        federation_id=federation_id,
        joiner=identity.fingerprint,
        key=identity.public_key_b64(),
        x25519=x25519_b64,
        role=role,  # type: ignore[arg-type]  # checked by the strict round trip in sign_struct
        invite=base64.b64encode(invite).decode("ascii") if invite else "",
        time=int(time.time() if now is None else now),
    )
    try:
        return msgspec.json.encode(sign_struct(identity, request))
    except ValueError as exc:
        raise JoinError(FederationReason.MALFORMED, str(exc)) from None


def verify_join(
    descriptor: FederationDescriptor, data: bytes, now: float | None = None, max_skew_s: int = MAX_JOIN_SKEW_S
) -> Member:
    """The new member if `data` is a valid, fresh join request that the admission policy accepts; else JoinError."""
    request = decode_strict(data, JoinRequest, MAX_JOIN_BYTES, JOIN_SCHEMA, JoinError)
    if request.federation_id != descriptor.federation_id:
        raise JoinError(
            FederationReason.OTHER_FEDERATION, f"the request is for federation {request.federation_id[:16]}…"
        )
    found = key_fingerprint(request.key)
    if found != request.joiner:
        raise JoinError(FederationReason.KEY_MISMATCH, f"the request's key is {found}, not the joiner {request.joiner}")
    if not signature_valid(request.key, request.signature, request):
        raise JoinError(
            FederationReason.BAD_SIGNATURE, f"the joiner's signature does not match the request ({request.joiner})"
        )
    _check_x25519(request.x25519)
    clock = time.time() if now is None else now
    if abs(clock - request.time) > max_skew_s:
        raise JoinError(
            FederationReason.STALE, f"the request was made at {request.time}, {clock - request.time:+.0f} s off"
        )
    nonce = _admit(descriptor, request, clock)
    return Member(
        fingerprint=request.joiner,
        key=request.key,
        x25519=request.x25519,
        joined=request.time,
        role=request.role,
        invite_nonce=nonce,
    )


def verify_admitted(descriptor: FederationDescriptor, data: bytes) -> Member:
    """A member stored before admissions were signed: `verify_join` judged at the time the request says it was made.

    Only for this node's own store: a request from a peer is a member only with the creator's AdmissionRecord
    (`verify_admission`), because a joiner chooses its request's time and could back-date it into an invite's
    validity."""
    request = decode_strict(data, JoinRequest, MAX_JOIN_BYTES, JOIN_SCHEMA, JoinError)
    return verify_join(descriptor, data, now=request.time)


class AdmissionRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The creator's signed word that it admitted a join request (by its sha256) at `admitted_at`, by its own clock."""

    schema: str
    federation_id: Sha256Hex
    joiner: Fingerprint
    request_sha256: Sha256Hex
    admitted_at: UnixTime
    signature: SignatureB64 = ""


def sign_admission(
    identity: Identity, descriptor: FederationDescriptor, request: bytes, now: float | None = None
) -> bytes:
    """The AdmissionRecord (JSON bytes) of a join request the creator `identity` has just verified."""
    joiner = decode_strict(request, JoinRequest, MAX_JOIN_BYTES, JOIN_SCHEMA, JoinError).joiner
    admission = AdmissionRecord(
        schema=ADMISSION_SCHEMA,
        federation_id=descriptor.federation_id,
        joiner=joiner,
        request_sha256=hashlib.sha256(request).hexdigest(),
        admitted_at=int(time.time() if now is None else now),
    )
    return msgspec.json.encode(sign_struct(identity, admission))


def verify_admission(descriptor: FederationDescriptor, request: bytes, admission: bytes) -> Member:
    """The member a join request and its AdmissionRecord admit: the admission is the creator's (signature), names this
    federation, the joiner and the request's sha256, and the request is valid at `admitted_at` (the creator's clock,
    not the time the joiner wrote into its request); else JoinError."""
    adm = decode_strict(admission, AdmissionRecord, MAX_ADMISSION_BYTES, ADMISSION_SCHEMA, JoinError)
    if adm.federation_id != descriptor.federation_id:
        raise JoinError(FederationReason.OTHER_FEDERATION, f"the admission is for federation {adm.federation_id[:16]}…")
    if not signature_valid(descriptor.creator_key, adm.signature, adm):
        raise JoinError(
            FederationReason.NOT_CREATOR, f"the admission is not signed by the creator {descriptor.creator}"
        )
    if adm.request_sha256 != hashlib.sha256(request).hexdigest():
        raise JoinError(FederationReason.INCONSISTENT, "the admission is for another join request")
    member = verify_join(descriptor, request, now=adm.admitted_at)
    if member.fingerprint != adm.joiner:
        raise JoinError(FederationReason.INCONSISTENT, f"the admission names {adm.joiner}, not {member.fingerprint}")
    return member


def _check_x25519(text: str) -> None:
    try:
        raw = strict_b64decode(text)
    except ValueError as exc:
        raise JoinError(FederationReason.MALFORMED, f"x25519: {exc}") from None
    if len(raw) != 32:
        raise JoinError(FederationReason.MALFORMED, f"x25519: an X25519 public key is 32 bytes, got {len(raw)}")


def _admit(descriptor: FederationDescriptor, request: JoinRequest, now: float) -> str:
    """Apply the admission policy; return the nonce of the invite used ('' if none was needed)."""
    if descriptor.admission == "open" or request.joiner == descriptor.creator:
        return ""
    if not request.invite:
        raise JoinError(FederationReason.INVITE_REQUIRED, f"federation {descriptor.name!r} admits only invited nodes")
    try:
        token_bytes = strict_b64decode(request.invite)
    except ValueError as exc:
        raise JoinError(FederationReason.MALFORMED, f"invite: {exc}") from None
    try:
        token = check_invite(descriptor, token_bytes, request.joiner, now)
    except InviteError as exc:
        raise JoinError(exc.reason, f"invite: {exc.detail}") from None
    return token.nonce


def describe(descriptor: FederationDescriptor) -> dict[str, Any]:
    """A JSON-ready summary (with the federation id) for logs and the API."""
    body: dict[str, Any] = msgspec.to_builtins(descriptor)
    body.pop("signature", None)
    body["federation_id"] = descriptor.federation_id
    return body
