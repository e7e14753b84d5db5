"""Test data shared by the round tests and the update-stream tests: a tiny adapter and signed updates of it."""

import numpy as np
import safetensors.numpy

from crypto.identity import Identity
from federation.messages import Kind, sign_update_header
from federation.update import Layout, encode_tensors

ROUND = 3


def adapter(seed: int = 0, rows: int = 6) -> dict[str, np.ndarray]:
    """A rank-2 LoRA pair of q_proj with random values (`rows` changes the layout)."""
    rng = np.random.default_rng(seed)
    return {
        "q_proj.lora_A.weight": rng.standard_normal((2, 5)).astype(np.float32),
        "q_proj.lora_B.weight": rng.standard_normal((rows, 2)).astype(np.float32),
    }


LAYOUT = Layout.of(adapter())


def signed_update(
    node: Identity,
    payload: bytes | None = None,
    *,
    fid: str,
    round: int = ROUND,
    kind: Kind = "plain",
    layout: str | None = None,
    header_payload: bytes | None = None,
) -> tuple[bytes, bytes]:
    """A signed header and its payload (by default a good plain update of round 3)."""
    payload = encode_tensors(adapter(7)) if payload is None else payload
    header = sign_update_header(
        node,
        federation_id=fid,
        round=round,
        layout_digest=LAYOUT.digest() if layout is None else layout,
        kind=kind,
        payload=payload if header_payload is None else header_payload,
    )
    return header, payload


def non_finite(value: float) -> bytes:
    """A plain update payload of the round's layout with one `value` (NaN or inf) in it."""
    tensors = adapter(7)
    tensors["q_proj.lora_B.weight"][2, 1] = value
    return safetensors.numpy.save(tensors)
