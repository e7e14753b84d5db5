"""Sentence embeddings through llama.cpp's embedding mode (node.memory.embed_model: why not transformers).

Every call blocks (one llama.cpp context behind a lock): async callers run `embed` in a worker thread.
"""

import ctypes
import threading
from pathlib import Path

import llama_cpp as ll
import numpy as np

from node.inference.llama_backend import LlamaModel
from node.memory.embed_model import DIMENSIONS, MAX_TOKENS, embedding_gguf

MAX_BATCH_TOKENS = 256  # measured: 81 texts/s at 256, 70 at 512, 61 at 1024 (attention spans the whole batch)
MAX_SEQUENCES = 8


class Embedder:
    """all-MiniLM-L6-v2 on llama.cpp: unit-length 384-dimensional vectors, texts cut at 256 word pieces."""

    dimensions = DIMENSIONS
    model_name = "all-minilm-l6-v2"

    def __init__(self, cache: Path, threads: int = 2) -> None:
        # f32 weights: llama.cpp's extra buffer types repack quantized weights only, so they are off here and this
        # model needs no probe (node.inference.extra_buffers)
        self.model = LlamaModel(embedding_gguf(cache), extra_buffers=False)
        params = ll.llama_context_default_params()
        params.n_ctx = MAX_BATCH_TOKENS * MAX_SEQUENCES  # llama.cpp wants n_ctx a multiple of n_seq_max
        params.n_batch = params.n_ubatch = MAX_BATCH_TOKENS
        params.n_seq_max = MAX_SEQUENCES
        params.n_threads = params.n_threads_batch = max(1, threads)
        params.embeddings = True
        params.pooling_type = ll.LLAMA_POOLING_TYPE_MEAN
        ctx = ll.llama_init_from_model(self.model.ptr, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create the embedding context")
        self._ctx = ctx
        self._batch = ll.llama_batch_init(MAX_BATCH_TOKENS, 0, MAX_SEQUENCES)
        self._lock = threading.Lock()

    def _check_open(self) -> None:
        if not self._ctx:
            raise RuntimeError("the embedding model is closed")

    def tokens(self, text: str) -> list[int]:
        """The word pieces of `text` as the model sees them ([CLS] ... [SEP], at most 256)."""
        self._check_open()
        ids = self.model.tokenize(text, add_special=True, parse_special=False)
        if len(ids) > MAX_TOKENS:
            ids = [*ids[: MAX_TOKENS - 1], ids[-1]]  # keep [SEP] at the end, as the tokenizer's truncation does
        return ids

    def count_tokens(self, text: str) -> int:
        """How many word pieces `text` has before truncation (for /v1/embeddings' usage)."""
        self._check_open()
        return len(self.model.tokenize(text, add_special=True, parse_special=False))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings of `texts`, shape (len(texts), 384), float32."""
        out = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        pending = [(i, self.tokens(t)) for i, t in enumerate(texts)]
        with self._lock:
            self._check_open()
            start = 0
            while start < len(pending):
                group: list[tuple[int, list[int]]] = []
                used = 0
                while start < len(pending) and len(group) < MAX_SEQUENCES:
                    if group and used + len(pending[start][1]) > MAX_BATCH_TOKENS:
                        break
                    group.append(pending[start])
                    used += len(pending[start][1])
                    start += 1
                for row, vector in self._run(group):
                    out[row] = vector
        return out

    def _run(self, group: list[tuple[int, list[int]]]) -> list[tuple[int, np.ndarray]]:
        b = self._batch
        n = 0
        for seq, (_row, ids) in enumerate(group):
            for pos, token in enumerate(ids):
                b.token[n] = token
                b.pos[n] = pos
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq
                b.logits[n] = True
                n += 1
        b.n_tokens = n
        memory = ll.llama_get_memory(self._ctx)
        if memory:
            ll.llama_memory_clear(memory, True)
        code = ll.llama_decode(self._ctx, b)
        if code != 0:
            raise RuntimeError(f"llama.cpp's embedding pass failed (llama_decode returned {code})")
        rows = []
        for seq, (row, _ids) in enumerate(group):
            ptr = ll.llama_get_embeddings_seq(self._ctx, seq)
            vec = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(DIMENSIONS,))
            vec = vec.astype(np.float32, copy=True)
            norm = float(np.linalg.norm(vec))
            rows.append((row, vec / norm if norm > 0 else vec))
        return rows

    def close(self) -> None:
        """Free the context and the weights."""
        with self._lock:
            if self._ctx:
                ll.llama_batch_free(self._batch)
                ll.llama_free(self._ctx)
                self._ctx = None
            self.model.close()
