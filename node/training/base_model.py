"""The torch twin of the served GGUF: dequantized once, cached as a model folder, tokenizing like llama.cpp."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from crypto.statement import sha256_file

CACHE_MARKER = "mirador-base.json"


def file_digest(path: Path) -> str:
    """sha256 of a file, streamed (the GGUF's identity for caches and adapter manifests)."""
    return sha256_file(path)


def fix_digit_splitting(tokenizer: Any) -> None:
    """Make a GGUF-built fast tokenizer split digits one by one, as llama.cpp's Llama-BPE pre-tokenizer does.

    transformers builds the pre-tokenizer from the GGUF as a bare ByteLevel; llama.cpp splits every digit first.
    Without this, "2024" is one or two tokens in torch and four in llama.cpp (DESIGN.md §6, Training).
    """
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    current = backend.pre_tokenizer
    state = current.__getstate__() if current is not None else b""
    if b'"Digits"' in state:
        return
    parts = [pre_tokenizers.Digits(individual_digits=True)]
    if current is not None:
        parts.append(current)
    backend.pre_tokenizer = pre_tokenizers.Sequence(parts)


def torch_base_dir(models_dir: Path, gguf_path: Path) -> Path:
    """Where the dequantized twin of `gguf_path` lives: keyed by the GGUF's sha256, so a changed file is redone."""
    return models_dir / "torch" / file_digest(gguf_path)[:16]


def ensure_torch_base(models_dir: Path, gguf_path: Path) -> Path:
    """Dequantize `gguf_path` into a cached HF model folder (fp32 safetensors + tokenizer) unless it exists."""
    target = torch_base_dir(models_dir, gguf_path)
    if (target / CACHE_MARKER).is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        fix_digit_splitting(tok)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        model.hf_quantizer = None  # type: ignore[assignment]  # fp32 now; save_pretrained refuses otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / CACHE_MARKER).write_text(f'{{"gguf": "{gguf_path.name}"}}\n')
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_torch_base(folder: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a cached folder, the tokenizer with llama.cpp's digit splitting."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    fix_digit_splitting(tok)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    return model, tok
