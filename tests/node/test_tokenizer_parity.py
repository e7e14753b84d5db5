"""The torch tokenizer built from the GGUF must tokenize exactly as llama.cpp does (digits included)."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from node.inference.llama_backend import LlamaModel
from node.inference.models import embedded_model_path
from node.training.base_model import CACHE_MARKER, ensure_torch_base, fix_digit_splitting

pytestmark = pytest.mark.slow  # the dequantized torch model

TEXTS = [
    "In 2024 the budget grew by 3.5% to 1,250,000 dollars.",
    "Call 555-0199 before 10:30, or email me at a.b@example.org!",
    "def f(x):\n    return x ** 2 + 42  # the answer\n",
    "Üben Sie täglich – 東京 is 9,000 km away; café au lait costs €4.50.",
    "   leading spaces, tabs\tand\nnewlines\n\n  ",
    "Version v0.19.0 replaced 0.18.1 on 2026-05-01 at 23:59:59 UTC.",
]


@pytest.mark.parametrize("text", TEXTS)
def test_cached_tokenizer_matches_llama_cpp(torch_base_folder: Path, llama: LlamaModel, text: str) -> None:
    tok = AutoTokenizer.from_pretrained(str(torch_base_folder))
    fix_digit_splitting(tok)
    assert tok(text).input_ids == llama.tokenize(text, add_special=True, parse_special=False)


def test_digit_fix_puts_digits_before_byte_level_once() -> None:
    # With transformers 5.24 and SmolLM2's vocabulary (single-digit tokens only) the raw GGUF tokenizer already
    # matched llama.cpp on every text tried; the fix keeps vocabularies with multi-digit merges correct too.
    path = embedded_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fix_digit_splitting(tok)
    fix_digit_splitting(tok)
    state = tok.backend_tokenizer.pre_tokenizer.__getstate__().decode()
    assert state.count('"Digits"') == 1
    assert state.index('"Digits"') < state.index('"ByteLevel"')
    assert tok("x2024y").input_ids == [tok.convert_tokens_to_ids(t) for t in ["x", "2", "0", "2", "4", "y"]]


def test_base_is_cached_and_not_redone(torch_base_folder: Path) -> None:
    marker = torch_base_folder / CACHE_MARKER
    before = marker.stat().st_mtime_ns
    again = ensure_torch_base(torch_base_folder.parent.parent, embedded_model_path())
    assert again == torch_base_folder and marker.stat().st_mtime_ns == before
    assert (torch_base_folder / "model.safetensors").is_file()
    assert not list(torch_base_folder.glob("*.bin")), "no pickle files in the cache"
