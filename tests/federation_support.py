"""What federation tests share: a signed descriptor of a small `dp` federation, at a fixed time."""

from typing import Any

from crypto.identity import Identity
from federation.descriptor import AdapterConfig, DpParams, Privacy, sign_descriptor

NOW = 1_800_000_000


def make_descriptor(creator: Identity, name: str = "finance-club", **over: Any) -> bytes:
    """A descriptor signed by `creator` (q,v rank 8, dp with clip 1 and z 1, created at NOW); `over` replaces fields."""
    kwargs: dict[str, Any] = {
        "name": name,
        "base_sha256": "ab" * 32,
        "adapter": AdapterConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")),
        "privacy": Privacy(mode="dp", dp=DpParams(clip_norm=1.0, noise_multiplier=1.0)),
        "created": NOW,
    }
    return sign_descriptor(creator, **(kwargs | over))
