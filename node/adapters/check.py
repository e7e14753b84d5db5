"""Fail-fast checks of a LoRA adapter file before llama.cpp ever opens it.

llama.cpp aborts or misbehaves on some malformed adapters, so every adapter is checked here first: no pickle
formats at all, a parseable GGUF whose tensors all lie inside the file, `general.type = adapter`,
`adapter.type = lora`, the base model's architecture, and every lora_a/lora_b pair shaped for the base model.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.refusal import SingleReason
from marketplace.manifest import PICKLE_SUFFIXES
from node.training.lora_export import GGUF_NAMES

_TENSOR = re.compile(rf"^blk\.(\d+)\.({'|'.join(GGUF_NAMES.values())})\.weight\.lora_([ab])$")


class AdapterRejected(SingleReason):
    """The adapter file is refused; the message says why."""

    REASON = "bad_adapter"


@dataclass(frozen=True)
class BaseDims:
    """The shapes an adapter for this base must have."""

    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    def matrix(self, name: str) -> tuple[int, int]:
        """(out, in) of the base matrix `name` (GGUF short name)."""
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        return {
            "attn_q": (q, self.n_embd),
            "attn_k": (kv, self.n_embd),
            "attn_v": (kv, self.n_embd),
            "attn_output": (self.n_embd, q),
            "ffn_gate": (self.n_ff, self.n_embd),
            "ffn_up": (self.n_ff, self.n_embd),
            "ffn_down": (self.n_embd, self.n_ff),
        }[name]


def base_dims(meta: Callable[[str], str | None]) -> BaseDims:
    """BaseDims from a base model's GGUF metadata lookup (key -> text value or None), e.g. `LlamaModel.meta`."""
    arch = meta("general.architecture") or ""

    def num(key: str) -> int:
        value = meta(f"{arch}.{key}")
        if value is None:
            raise ValueError(f"the base model has no {arch}.{key}")
        return int(value)

    return BaseDims(
        arch,
        num("block_count"),
        num("embedding_length"),
        num("feed_forward_length"),
        num("attention.head_count"),
        num("attention.head_count_kv"),
    )


def base_dims_of_file(gguf_path: Path) -> BaseDims:
    """BaseDims read from a base model's GGUF header (no llama.cpp load)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    return base_dims(lambda key: _text(reader, key))


def _text(reader: object, key: str) -> str | None:
    field = reader.get_field(key)  # type: ignore[attr-defined]
    if field is None:
        return None
    value = field.contents()
    return str(value)


def check_adapter_file(path: Path, dims: BaseDims) -> None:
    """Raise AdapterRejected unless `path` is a well-formed GGUF LoRA adapter for the base `dims`."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterRejected(
            f"{path.name}: pickle formats ({', '.join(sorted(PICKLE_SUFFIXES))}) are never "
            "loaded; use a GGUF adapter (or peft safetensors, exported with `mirador train`)"
        )
    if not path.is_file():
        raise AdapterRejected(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise AdapterRejected(f"{path.name}: not a GGUF file (starts with {magic!r})")
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors... on damaged files
        raise AdapterRejected(f"{path.name}: truncated or damaged GGUF ({type(exc).__name__}: {exc})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise AdapterRejected(
                f"{path.name}: truncated: tensor {t.name} ends at byte "
                f"{t.data_offset + t.n_bytes} of a {size}-byte file"
            )
    kind, lora, arch = (_text(reader, k) for k in ("general.type", "adapter.type", "general.architecture"))
    if kind != "adapter" or lora != "lora":
        raise AdapterRejected(f"{path.name}: not a LoRA adapter (general.type={kind!r}, adapter.type={lora!r})")
    if arch != dims.architecture:
        raise AdapterRejected(f"{path.name}: made for architecture {arch!r}, the base is {dims.architecture!r}")
    _check_tensors(path.name, reader.tensors, dims)


def _check_tensors(name: str, tensors: list[Any], dims: BaseDims) -> None:
    pairs: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    for t in tensors:
        m = _TENSOR.match(t.name)
        if m is None:
            raise AdapterRejected(f"{name}: unexpected tensor {t.name!r}")
        layer = int(m.group(1))
        if layer >= dims.n_layer:
            raise AdapterRejected(f"{name}: tensor {t.name} is for layer {layer}; the base has {dims.n_layer}")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = tuple(int(x) for x in reversed(t.shape))
    if not pairs:
        raise AdapterRejected(f"{name}: the adapter has no LoRA tensors")
    for (layer, matrix), ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            raise AdapterRejected(f"{name}: blk.{layer}.{matrix} lacks its lora_a or lora_b")
        (r_a, n_in), (n_out, r_b) = ab["a"], ab["b"]
        want_out, want_in = dims.matrix(matrix)
        if (n_out, n_in) != (want_out, want_in) or r_a != r_b:
            raise AdapterRejected(
                f"{name}: blk.{layer}.{matrix} has lora_b x lora_a = ({n_out} x {r_b}) x ({r_a} x {n_in}); "
                f"the base matrix is {want_out} x {want_in} (hidden size or architecture mismatch)"
            )
