"""Bad adapter files are refused with a clear reason before llama.cpp sees them."""

from pathlib import Path

import numpy as np
import pytest

from node.adapter_check import AdapterRejected, BaseDims, base_dims, check_adapter_file
from node.llama_backend import BatchContext, LlamaModel, LoraAdapter
from node.models import embedded_model_path
from node.training.lora_export import LoraShape, write_gguf_lora

META_KEYS = [
    "general.architecture",
    "llama.block_count",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
]


@pytest.fixture(scope="module")
def dims(llama: LlamaModel) -> BaseDims:
    return base_dims({k: llama.meta(k) for k in META_KEYS})


def lora_state(dims: BaseDims, n_embd: int | None = None, r: int = 4) -> dict[str, np.ndarray]:
    """A q,v LoRA state dict in peft naming for all layers (optionally for a wrong hidden size)."""
    rng = np.random.default_rng(0)
    e = n_embd or dims.n_embd
    kv = dims.n_head_kv * (e // dims.n_head)
    state = {}
    for i in range(dims.n_layer):
        for mod, out in (("q_proj", e), ("v_proj", kv)):
            key = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            state[f"{key}.lora_A.weight"] = rng.normal(size=(r, e)).astype(np.float32) * 0.01
            state[f"{key}.lora_B.weight"] = rng.normal(size=(out, r)).astype(np.float32) * 0.01
    return state


def write(path: Path, dims: BaseDims, n_embd: int | None = None, arch: str = "llama") -> Path:
    write_gguf_lora(path, lora_state(dims, n_embd), LoraShape(dims.n_head, dims.n_head_kv, 8.0, arch))
    return path


def test_dims_of_the_embedded_model(dims: BaseDims) -> None:
    assert (dims.architecture, dims.n_layer, dims.n_embd, dims.n_head, dims.n_head_kv) == ("llama", 30, 576, 9, 3)


def test_a_good_adapter_passes_and_llama_cpp_loads_it(tmp_path: Path, llama: LlamaModel, dims: BaseDims) -> None:
    path = write(tmp_path / "good.gguf", dims)
    check_adapter_file(path, dims)
    adapter = LoraAdapter(llama, path)
    ctx = BatchContext(llama, 128, 1, 32, 1)
    ctx.set_adapters([(adapter, 1.0)])
    ctx.close()
    adapter.close()


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d, t: write(t / "wide.gguf", d, n_embd=d.n_embd * 2), "hidden size or architecture mismatch"),
        (lambda d, t: write(t / "other.gguf", d, arch="qwen2"), "made for architecture 'qwen2'"),
        (lambda d, t: truncate(write(t / "cut.gguf", d)), "truncated or damaged"),
        (
            lambda d, t: (t / "cut2.gguf").write_bytes((write(t / "x.gguf", d)).read_bytes()[:40]) and t / "cut2.gguf",
            "truncated or damaged",
        ),
        (lambda d, t: embedded_model_path(), "not a LoRA adapter"),
        (lambda d, t: (t / "junk.gguf").write_bytes(b"\x80\x04\x95junk") and t / "junk.gguf", "not a GGUF file"),
        (lambda d, t: t / "adapter_model.bin", "pickle formats"),
        (lambda d, t: t / "adapter.pt", "pickle formats"),
        (lambda d, t: t / "adapter.pkl", "pickle formats"),
    ],
)
def test_bad_adapter_is_refused(tmp_path: Path, dims: BaseDims, make: object, reason: str) -> None:
    path = make(dims, tmp_path)  # type: ignore[operator]
    with pytest.raises(AdapterRejected) as info:
        check_adapter_file(path, dims)
    assert reason in str(info.value)
