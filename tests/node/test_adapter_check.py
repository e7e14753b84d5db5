"""Bad adapter files are refused with a clear reason before llama.cpp sees them."""

from pathlib import Path

import pytest

from node.adapters.check import AdapterRejected, BaseDims, base_dims, check_adapter_file
from node.inference.llama_backend import BatchContext, LlamaModel, LoraAdapter
from node.inference.models import embedded_model_path
from tests.lora_files import write_adapter


@pytest.fixture(scope="module")
def dims(llama: LlamaModel) -> BaseDims:
    return base_dims(llama.meta)


def test_dims_of_the_embedded_model(dims: BaseDims) -> None:
    assert (dims.architecture, dims.n_layer, dims.n_embd, dims.n_head, dims.n_head_kv) == ("llama", 30, 576, 9, 3)


def test_a_good_adapter_passes_and_llama_cpp_loads_it(tmp_path: Path, llama: LlamaModel, dims: BaseDims) -> None:
    path = write_adapter(tmp_path / "good.gguf", dims)
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
        (lambda d, t: write_adapter(t / "wide.gguf", d, n_embd=d.n_embd * 2), "hidden size or architecture mismatch"),
        (lambda d, t: write_adapter(t / "other.gguf", d, arch="qwen2"), "made for architecture 'qwen2'"),
        (lambda d, t: truncate(write_adapter(t / "cut.gguf", d)), "truncated or damaged"),
        (
            lambda d, t: (
                (t / "cut2.gguf").write_bytes((write_adapter(t / "x.gguf", d)).read_bytes()[:40]) and t / "cut2.gguf"
            ),
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
