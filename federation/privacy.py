"""What leaves a member, what the aggregator makes of it, and how members apply it, per privacy mode.

- `dp-user`: the member clips its update (the change of the adapter over the round) to C and adds N(0, (z·C)²):
  every released update is the output of an accounted Gaussian mechanism (one spend (z, q=1, T=1) per round: the
  unit is the member's whole update, so the guarantee is per member, not per example; add/remove adjacency,
  sensitivity C). The aggregator may use any strategy, robust ones included. Its noise has norm z·C·√(d/n) in the
  mean of n updates of d values: only federations of thousands of members learn (`check_user_level`).
- `dp`: each member trains from the global adapter with DP-SGD (opacus: Poisson sampling at its own rate q,
  per-example clipping to C, noise z·C per step) for the federation's `local_steps`; the update is released as it
  is (post-processing). Unit of privacy: one training example; spend (z, q, local_steps) per round.
- `he+dp`: the same training; the update is CKKS-encrypted and summed blind, as in `he`.
- `he`: the member clips to C (bounding any one member's influence) and encrypts under the federation's CKKS key;
  the aggregator adds ciphertexts without a secret key; members decrypt the sum and divide by the count.
- `he+dp-user`: like `he`, but each member also adds its share 1/quorum of the noise variance, so whenever at least
  a quorum of members contribute, the decrypted sum carries at least N(0, (z·C)²), while no single update is seen in
  clear by anyone. A member who decrypts knows its own share, so one update is protected by the others' shares
  only: the spend is (z·√((k−1)/k), 1, 1) at a quorum of k (`effective_noise_multiplier`).

Plain updates travel as float32, or as 8-bit codes with a scale per tensor where the descriptor says "q8"
(federation.quantize: post-processing, no change to any guarantee); aggregates are always float32.

Encrypted aggregation is an unweighted mean (each contributor counts once); plain aggregation follows the strategy.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from crypto.dp import Spend, clip_l2, default_rng, privatize
from crypto.he import EncryptedVector, HEContext, SecretContext, add_encrypted, decrypt_vector, encrypt_vector
from federation.descriptor import FederationDescriptor
from federation.messages import Kind
from federation.quantize import dequantize, quantize
from federation.strategies import make_strategy
from federation.strategies.base import Update
from federation.update import Layout, decode_tensors, encode_tensors, flatten, unflatten

MAX_PLAIN_BYTES = 256 * 1024 * 1024
LORA_A_SUFFIX = ".lora_A.weight"  # peft's name of the down-projection, frozen under FFA-LoRA


class PrivacyError(ValueError):
    """A release or an aggregate that this mode cannot produce or accept; the message says why."""


@dataclass(frozen=True)
class Release:
    """One member's update as it leaves the node: its kind, its bytes, the DP spend it costs (None: none), and the
    released values in clear (what was encoded or encrypted; kept only on this node, for audit)."""

    kind: Kind
    payload: bytes
    spend: Spend | None
    vector: np.ndarray


MAX_NOISE_TO_UPDATE = 1.0  # user-level DP: noise larger than a clipped update in the mean drowns what is learned


def noise_share(descriptor: FederationDescriptor) -> float:
    """The fraction of the variance (z·C)² each member adds: 1/quorum under HE (the decrypted sum of at least a
    quorum of shares carries all of it), 1 in clear."""
    return 1.0 / descriptor.quorum if descriptor.uses_he else 1.0


def effective_noise_multiplier(descriptor: FederationDescriptor) -> float:
    """The z that protects one member's update against the others.

    In clear every member adds the whole noise: z. Under HE the noise is split into shares, and every member who
    decrypts the sum knows its own share: with a quorum of k contributors, one update is hidden by the k − 1 other
    shares only, (k − 1)/k of the variance, so z·√((k − 1)/k) (z/√2 at a quorum of 2: ε 6.58 instead of 4.39 for
    z = 1). Adjacency: add or remove one member's update, whose L2 norm is clipped to C (sensitivity C)."""
    z = descriptor.privacy.dp.noise_multiplier
    if not descriptor.uses_he:
        return z
    k = descriptor.quorum
    return z * math.sqrt((k - 1) / k)


def update_kind(descriptor: FederationDescriptor) -> Kind:
    """How this federation's updates travel: "ckks" under HE, else "q8" or "plain" as its update_encoding says."""
    if descriptor.uses_he:
        return "ckks"
    return "q8" if descriptor.update_encoding == "q8" else "plain"


def decode_update(kind: Kind, payload: bytes, layout: Layout) -> dict[str, np.ndarray]:
    """The float32 tensors of one plain or q8 update payload (UpdateError if it is not one of `layout`)."""
    if kind == "q8":
        return dequantize(payload, layout, MAX_PLAIN_BYTES)
    if kind == "plain":
        return decode_tensors(payload, layout, MAX_PLAIN_BYTES)
    raise PrivacyError(f"a {kind} update has no tensors in clear")


def round_spend(descriptor: FederationDescriptor, sample_rate: float | None = None) -> Spend | None:
    """The privacy cost of one round's release under this federation (None in `he` mode: no DP claim).

    Example-level modes: `local_steps` steps of DP-SGD at the federation's z with this node's Poisson `sample_rate`
    (its expected batch over its number of examples), which they require. User-level modes: one Gaussian release of
    the whole update (q = 1) at the effective z."""
    if not descriptor.uses_dp:
        return None
    if descriptor.example_level:
        if sample_rate is None or not 0 < sample_rate <= 1:
            raise PrivacyError(f"mode {descriptor.privacy.mode!r} is accounted with a sample rate in (0, 1]")
        return Spend(descriptor.privacy.dp.noise_multiplier, sample_rate, descriptor.local_steps)
    return Spend(effective_noise_multiplier(descriptor), 1.0, 1)


def unit_of_privacy(descriptor: FederationDescriptor) -> str:
    """What one ε of this federation protects, in words (for `federation status` and the API)."""
    if descriptor.example_level:
        return "one training example of this node's data (a paragraph or a chat exchange), by DP-SGD"
    if descriptor.user_level:
        return "all of this node's data in a round (its whole update, clipped and noised)"
    return "none: updates are encrypted, the decrypted mean carries no DP guarantee"


def noise_to_update(descriptor: FederationDescriptor, params: int, members: int) -> float:
    """Expected L2 norm of the noise in the mean of `members` released updates of `params` values, over the norm C
    of one clipped update: z·√(share·params/members)."""
    return descriptor.privacy.dp.noise_multiplier * math.sqrt(noise_share(descriptor) * params / members)


def members_needed(descriptor: FederationDescriptor, params: int, ratio: float = MAX_NOISE_TO_UPDATE) -> int:
    """The fewest contributors per round for which `noise_to_update` is at most `ratio`."""
    z = descriptor.privacy.dp.noise_multiplier
    return max(descriptor.quorum, math.ceil(z * z * noise_share(descriptor) * params / (ratio * ratio)))


def check_user_level(descriptor: FederationDescriptor, params: int, members: int) -> float:
    """Raise PrivacyError unless a user-level federation of `members` contributors per round learns anything
    (noise no larger than an update in the mean); the noise-to-update ratio otherwise."""
    ratio = noise_to_update(descriptor, params, members)
    if ratio > MAX_NOISE_TO_UPDATE:
        raise PrivacyError(
            f"in mode {descriptor.privacy.mode!r} with {members} members the noise in the mean update would be "
            f"{ratio:.3g}× a clipped update (z = {descriptor.privacy.dp.noise_multiplier:g}, {params} parameters): "
            f"it needs about {members_needed(descriptor, params)} members per round; use mode 'dp' (example-level "
            "DP-SGD) for small federations"
        )
    return ratio


def release(
    delta: Mapping[str, np.ndarray],
    layout: Layout,
    descriptor: FederationDescriptor,
    he: HEContext | None = None,
    rng: np.random.Generator | None = None,
    trained: Spend | None = None,
) -> Release:
    """Privatize (and encrypt, under HE) one member's update `delta` = local adapter − global adapter.

    In example-level modes `delta` must come from DP-SGD training that spent `trained` (required, and checked
    against the federation's z and steps): the update is released as it is, post-processing of that run."""
    dp = descriptor.privacy.dp
    vector = flatten(dict(delta), layout)
    if descriptor.example_level:
        if trained is None:
            raise PrivacyError(f"mode {descriptor.privacy.mode!r} releases only updates trained with DP-SGD")
        spend = round_spend(descriptor, trained.sample_rate)
        if spend != trained:
            raise PrivacyError(f"the update was trained at {trained}, the federation's rounds are {spend}")
    elif descriptor.uses_dp:
        share = noise_share(descriptor)
        vector = privatize(vector, dp.clip_norm, dp.noise_multiplier, rng or default_rng(), share=share)
        spend = round_spend(descriptor)
    else:
        vector, _ = clip_l2(vector, dp.clip_norm)
        spend = None
    vector = vector.astype(np.float32)
    kind = update_kind(descriptor)
    if kind == "q8":
        payload = quantize(unflatten(vector, layout), layout, rng or default_rng())
        return Release(kind, payload, spend, flatten(dequantize(payload, layout, MAX_PLAIN_BYTES), layout))
    if kind == "plain":
        return Release(kind, encode_tensors(unflatten(vector, layout)), spend, vector)
    if he is None:
        raise PrivacyError(f"mode {descriptor.privacy.mode!r} needs the federation's CKKS context to release")
    return Release("ckks", encrypt_vector(he, vector).serialize(), spend, vector)


@dataclass(frozen=True)
class Combined:
    """The aggregator's output: payload (float32 safetensors mean update, or the CKKS sum), contributors, count."""

    kind: Kind
    payload: bytes
    contributors: list[str]
    count: int
    strategy: str


def combine(
    updates: Sequence[tuple[str, bytes]],
    layout: Layout,
    descriptor: FederationDescriptor,
    he: HEContext | None = None,
) -> Combined:
    """Aggregate accepted (member, payload) updates: the strategy on plain (or q8) ones, a blind sum on CKKS.

    Every update weighs the same: a weight a member declares (its number of examples) cannot be checked, and one
    member claiming 10^9 examples would move FedAvg's mean wherever it likes, past any clipping; sending it would also
    leak the dataset's size."""
    if not updates:
        raise PrivacyError("nothing to aggregate: no accepted updates")
    members = [member for member, _ in updates]
    if descriptor.uses_he:
        if he is None:
            raise PrivacyError("summing ciphertexts needs the federation's public CKKS context")
        vectors = [EncryptedVector.deserialize(he, payload) for _, payload in updates]
        total = add_encrypted(vectors).serialize()
        return Combined("ckks", total, members, len(updates), "fedavg")
    spec = descriptor.strategy
    strategy = make_strategy(spec.name, **spec.params)
    kind = update_kind(descriptor)
    parsed = [Update(member, flatten(decode_update(kind, payload, layout), layout), 1) for member, payload in updates]
    result = strategy.aggregate(parsed)
    mean = encode_tensors(unflatten(result.vector.astype(np.float32), layout))
    return Combined("plain", mean, list(result.members), len(result.members), strategy.name)


def mean_update(
    kind: Kind,
    payload: bytes,
    count: int,
    layout: Layout,
    secret: SecretContext | None = None,
) -> dict[str, np.ndarray]:
    """The aggregate's mean update as tensors: decoded (plain) or decrypted and divided by `count` (CKKS)."""
    if kind == "plain":
        return decode_tensors(payload, layout, MAX_PLAIN_BYTES)
    if secret is None:
        raise PrivacyError("decrypting the aggregate needs the federation's secret CKKS context")
    if count < 1:
        raise PrivacyError(f"an encrypted aggregate needs a positive contributor count, got {count}")
    summed = decrypt_vector(secret, EncryptedVector.deserialize(secret, payload))
    if summed.shape != (layout.size,):
        raise PrivacyError(f"the aggregate holds {summed.shape[0]} values; the adapter has {layout.size}")
    mean = summed / count
    if not np.all(np.isfinite(mean)):
        raise PrivacyError("the decrypted aggregate is not finite")
    return unflatten(mean.astype(np.float32), layout)


def update_layout(descriptor: FederationDescriptor, global_tensors: Mapping[str, np.ndarray]) -> Layout:
    """The tensors a round's update carries: all of the adapter's, or only the lora_B ones under FFA-LoRA."""
    frozen = descriptor.adapter.freeze_a
    return Layout.of({k: v for k, v in global_tensors.items() if not (frozen and k.endswith(LORA_A_SUFFIX))})


def apply_update(global_tensors: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The next global adapter: global + mean update on the tensors the update carries, the others kept as they are."""
    if not mean or not set(mean) <= set(global_tensors):
        raise PrivacyError("the aggregate's tensors are not the global adapter's")
    out = {}
    for name, value in global_tensors.items():
        if name not in mean:
            out[name] = value.astype(np.float32)
            continue
        if value.shape != mean[name].shape:
            raise PrivacyError(f"{name}: aggregate shape {mean[name].shape}, global {value.shape}")
        out[name] = (value.astype(np.float32) + mean[name].astype(np.float32)).astype(np.float32)
    return out


def delta_of(
    local: Mapping[str, np.ndarray], global_tensors: Mapping[str, np.ndarray], layout: Layout | None = None
) -> dict[str, np.ndarray]:
    """local − global on the tensors of `layout` (default: all), the member's update over the round; every tensor
    outside `layout` (lora_A under FFA-LoRA) must not have moved."""
    if set(local) != set(global_tensors):
        raise PrivacyError("the locally trained adapter's tensors are not the global adapter's")
    names = layout.names if layout is not None else tuple(sorted(global_tensors))
    for name in sorted(set(global_tensors) - set(names)):
        if not np.array_equal(local[name], global_tensors[name]):
            raise PrivacyError(f"{name} is frozen in this federation but local training changed it")
    return {k: (local[k].astype(np.float32) - global_tensors[k].astype(np.float32)) for k in names}


def noise_std_of_sum(descriptor: FederationDescriptor, contributors: int) -> float:
    """Std of the Gaussian noise added to the sum of `contributors` released updates (for reports and tests; the
    noise of example-level modes is inside each member's training, not added to its update)."""
    if not descriptor.user_level:
        return 0.0
    dp = descriptor.privacy.dp
    return dp.noise_multiplier * dp.clip_norm * math.sqrt(noise_share(descriptor) * contributors)
