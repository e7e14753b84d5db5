"""Random LoRA adapters written as real GGUF files, for tests that need adapters but not training."""

from pathlib import Path

import numpy as np

from node.adapters.check import BaseDims
from node.training.lora_export import LoraShape, write_gguf_lora


def lora_state(
    dims: BaseDims, n_embd: int | None = None, r: int = 4, seed: int = 0, std: float = 0.01
) -> dict[str, np.ndarray]:
    """A q,v LoRA state dict in peft naming for all layers (optionally for a wrong hidden size)."""
    rng = np.random.default_rng(seed)
    e = n_embd or dims.n_embd
    kv = dims.n_head_kv * (e // dims.n_head)
    state = {}
    for i in range(dims.n_layer):
        for mod, out in (("q_proj", e), ("v_proj", kv)):
            key = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            state[f"{key}.lora_A.weight"] = rng.normal(size=(r, e)).astype(np.float32) * std
            state[f"{key}.lora_B.weight"] = rng.normal(size=(out, r)).astype(np.float32) * std
    return state


def write_adapter(
    path: Path,
    dims: BaseDims,
    n_embd: int | None = None,
    arch: str = "llama",
    r: int = 4,
    seed: int = 0,
    std: float = 0.01,
) -> Path:
    """Write a random q,v adapter GGUF for `dims` (alpha = 2r) and return its path."""
    state = lora_state(dims, n_embd, r, seed, std)
    write_gguf_lora(path, state, LoraShape(dims.n_head, dims.n_head_kv, 2.0 * r, arch))
    return path


def strong_adapters(folder: Path, dims: BaseDims, names: list[str]) -> dict[str, Path]:
    """One strong random q,v adapter per name (r=8, std 0.1, 1.85 MB): greedy text differs from the base's."""
    return {
        name: write_adapter(folder / f"{name}.gguf", dims, r=8, seed=seed, std=0.1)
        for seed, name in enumerate(names, start=1)
    }
