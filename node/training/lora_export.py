"""Export a peft LoRA adapter (safetensors state dict) as a GGUF LoRA adapter that llama.cpp loads at run time.

Written for this project with PyPI `gguf` (llama.cpp's own converter is not in any wheel). The file holds:
`general.architecture`, `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and one F32 pair
`blk.{i}.{name}.weight.lora_a` (r x in) / `.lora_b` (out x r) per adapted matrix, peft's arrays as they are,
except that `lora_b` of q_proj and k_proj is row-permuted like llama.cpp's Llama q/k weights
(P·(B·A) = (P·B)·A). Without that permutation q/k adapters lose their effect in llama.cpp.
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# peft module name -> GGUF tensor name (gguf-py's Llama tensor map, for the matrices LoRA adapts)
GGUF_NAMES: Mapping[str, str] = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class ExportError(ValueError):
    """The adapter cannot be exported (unknown tensor, missing half of a pair, shape mismatch)."""


@dataclass(frozen=True)
class LoraShape:
    """What the exporter needs to know about the base and the adapter."""

    n_head: int
    n_kv_head: int
    alpha: float
    architecture: str = "llama"


def permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """Row permutation from the HF to the GGUF layout of a Llama q or k matrix, applied to `lora_B`."""
    rows = b.shape[0]
    if rows % (2 * n_head):
        raise ExportError(f"lora_B has {rows} rows, not divisible by 2 x {n_head} heads")
    return b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def gguf_tensors(state: Mapping[str, np.ndarray], shape: LoraShape, permute_qk: bool = True) -> dict[str, np.ndarray]:
    """Map a peft state dict to GGUF tensor names and layouts."""
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in state.items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in GGUF_NAMES:
            raise ExportError(f"unexpected tensor in the adapter: {key}")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = np.asarray(value, dtype=np.float32)
    out: dict[str, np.ndarray] = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ExportError(f"layer {layer} {module}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise ExportError(f"layer {layer} {module}: rank mismatch {a.shape} vs {b.shape}")
        if permute_qk and module == "q_proj":
            b = permute_rows(b, shape.n_head)
        elif permute_qk and module == "k_proj":
            b = permute_rows(b, shape.n_kv_head)
        name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        out[f"{name}.lora_a"] = np.ascontiguousarray(a)
        out[f"{name}.lora_b"] = np.ascontiguousarray(b)
    if not out:
        raise ExportError("the adapter has no LoRA tensors")
    return out


def write_gguf_lora(path: Path, state: Mapping[str, np.ndarray], shape: LoraShape, permute_qk: bool = True) -> None:
    """Write the GGUF adapter atomically (temp file, fsync, rename)."""
    import gguf

    tensors = gguf_tensors(state, shape, permute_qk)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch=shape.architecture)
    try:
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(shape.alpha))
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
