"""Parity of the GGUF LoRA exporter: llama.cpp (Q4_1 base + exported adapter) vs torch (base + peft adapter)."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from node.inference.llama_backend import BatchContext, LlamaModel, LoraAdapter
from node.training.base_model import load_torch_base
from node.training.lora_export import LoraShape, write_gguf_lora

pytestmark = pytest.mark.slow  # torch against llama.cpp on the dequantized model

PROMPTS = [
    "The weather today is",
    "My favourite recipe for bread uses",
    "In 1969, the first humans",
    "To invest wisely, one should",
    "The cat sat on the",
    "Python is a programming language that",
    "The tax return is due on",
    "Once upon a time in a distant land,",
    "The best way to learn music is",
    "Photosynthesis converts sunlight into",
    "A budget of 2500 dollars per month covers",
]


@pytest.fixture(scope="module")
def torch_base(torch_base_folder: Path) -> tuple[Any, Any]:
    return load_torch_base(torch_base_folder)


def make_adapter(base: Any, targets: list[str], seed: int) -> Any:
    """A peft LoRA with random non-zero A and B (peft's `init_lora_weights=False`).

    Its effect (1-2.6 logits on average) is of the size a trained adapter has; a much weaker adapter's effect
    drowns in llama.cpp's quantized-activation noise (measured: B x 0.09 gives effect correlation 0.3-0.5).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))


def torch_logits(model: Any, tok: Any, adapter_on: bool) -> tuple[np.ndarray, list[list[int]]]:
    rows, ids_all = [], []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        ids_all.append(ids[0].tolist())
        with torch.no_grad():
            if adapter_on:
                out = model(ids).logits
            else:
                with model.disable_adapter():
                    out = model(ids).logits
        rows.append(out[0, -1].numpy())
    return np.stack(rows), ids_all


def llama_logits(llama: LlamaModel, adapter: Path | None) -> tuple[np.ndarray, list[list[int]]]:
    ctx = BatchContext(llama, n_ctx_seq=256, n_seq=1, n_batch=64, n_threads=2)
    lora = LoraAdapter(llama, adapter) if adapter else None
    try:
        if lora:
            ctx.set_adapters([(lora, 1.0)])
        rows, ids_all = [], []
        for prompt in PROMPTS:
            ids = llama.tokenize(prompt, add_special=True, parse_special=False)
            ids_all.append(ids)
            ctx.forget(0)
            for i, t in enumerate(ids):
                ctx.add(t, i, 0, i == len(ids) - 1)
            ctx.decode()
            rows.append(ctx.logits(-1))
        return np.stack(rows), ids_all
    finally:
        ctx.close()
        if lora:
            lora.close()


def export(model: Any, path: Path, permute: bool) -> Path:
    from peft import get_peft_model_state_dict

    cfg = model.base_model.model.config
    state = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
    write_gguf_lora(path, state, LoraShape(cfg.num_attention_heads, cfg.num_key_value_heads, alpha=16.0), permute)
    return path


def effect_correlation(a_lora: np.ndarray, a_base: np.ndarray, b_lora: np.ndarray, b_base: np.ndarray) -> float:
    return float(np.corrcoef((a_lora - a_base).ravel(), (b_lora - b_base).ravel())[0, 1])


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj"]], ids=["qv", "qk"])
def test_exported_adapter_matches_torch(
    torch_base: tuple[Any, Any], llama: LlamaModel, tmp_path: Path, targets: list[str]
) -> None:
    # Arrange
    base, tok = torch_base
    model = make_adapter(base, targets, seed=1)
    try:
        t_lora, t_ids = torch_logits(model, tok, adapter_on=True)
        t_base, _ = torch_logits(model, tok, adapter_on=False)
        l_base, l_ids = llama_logits(llama, None)
        # Act
        l_lora, _ = llama_logits(llama, export(model, tmp_path / "a.gguf", permute=True))
        l_unpermuted, _ = llama_logits(llama, export(model, tmp_path / "raw.gguf", permute=False))
    finally:
        model.unload()  # give the shared base back without LoRA layers
    # Assert
    assert t_ids == l_ids, "torch and llama.cpp must tokenize identically"
    top1 = float(np.mean(t_lora.argmax(1) == l_lora.argmax(1)))
    effect = effect_correlation(l_lora, l_base, t_lora, t_base)
    assert top1 >= 0.9, top1
    assert effect >= 0.95, effect
    assert np.abs(t_lora - t_base).mean() > 0.5, "the adapter must act, or parity proves nothing"
    unpermuted = effect_correlation(l_unpermuted, l_base, t_lora, t_base)
    if "k_proj" in targets:
        assert unpermuted < 0.5, f"without the q/k permutation the q,k effect should collapse, got {unpermuted}"
    else:
        assert unpermuted < effect, unpermuted
