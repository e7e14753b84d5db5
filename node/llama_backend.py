"""A thin, fast layer over llama.cpp's low-level C API (llama-cpp-python's ctypes binding).

The per-token loop stays in C as much as possible: sampling runs in llama.cpp's sampler chain (no copy of the
49k-logit vector into Python), and each generated token costs one `llama_sampler_sample` call, one
`llama_decode` call and a dict lookup for its text. Every call here blocks: callers run them in worker threads.
"""

import ctypes
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as ll
from llama_cpp import _logger as ll_logger

log = logging.getLogger(__name__)
_backend_lock = threading.Lock()
_backend_ready = False


class ModelLoadError(Exception):
    """llama.cpp could not load the model file."""


class ContextOverflowError(ValueError):
    """The prompt does not fit in the context window."""


def _init_backend(verbose: bool) -> None:
    global _backend_ready
    with _backend_lock:
        ll_logger.set_verbose(verbose)
        if not _backend_ready:
            ll.llama_backend_init()
            _backend_ready = True


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; temperature 0 means greedy."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None


class LlamaModel:
    """One loaded GGUF model: weights, vocabulary, chat template, token texts."""

    def __init__(self, path: Path, verbose: bool = False) -> None:
        _init_backend(verbose)
        params = ll.llama_model_default_params()
        params.n_gpu_layers = 0
        ptr = ll.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ModelLoadError(f"llama.cpp could not load {path} (not a GGUF model, or unsupported)")
        self.path = Path(path)
        self.ptr = ptr
        self.vocab = ll.llama_model_get_vocab(ptr)
        self.n_vocab: int = ll.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = ll.llama_model_n_ctx_train(ptr)
        self.n_params: int = ll.llama_model_n_params(ptr)
        self.size_bytes: int = ll.llama_model_size(ptr)
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None if the key is absent."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", errors="replace")

    @property
    def description(self) -> str:
        """llama.cpp's one-line description, e.g. 'llama ?B Q4_1'."""
        buf = ctypes.create_string_buffer(256)
        ll.llama_model_desc(self.ptr, buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the GGUF, if any."""
        raw = ll.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int, special: bool = True) -> str:
        """The text of one token (special tokens rendered), for templates and stop strings."""
        return self.piece(token, special).decode("utf-8", errors="replace")

    @property
    def bos_token(self) -> int:
        """Beginning-of-sequence token id."""
        return int(ll.llama_vocab_bos(self.vocab))

    @property
    def eos_token(self) -> int:
        """End-of-sequence token id."""
        return int(ll.llama_vocab_eos(self.vocab))

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """Tokenize exactly as llama.cpp does."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        return list(arr[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (cached; a token may hold part of a UTF-8 character)."""
        key = token if not special else -1 - token
        cached = self._pieces.get(key)
        if cached is not None:
            return cached
        buf = self._piece_buf
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        out = buf.raw[:n]
        self._pieces[key] = out
        return out

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        """Free the weights; no slot may use the model afterwards."""
        if self.ptr:
            ll.llama_model_free(self.ptr)
            self.ptr = None


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class GenerationStats:
    """What one generation did: token counts, finish reason, timings (seconds)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"
    prompt_s: float = 0.0
    generate_s: float = 0.0


class LlamaSlot:
    """One llama.cpp context over a shared model: its own KV cache, used by one generation at a time."""

    def __init__(self, model: LlamaModel, n_ctx: int, n_batch: int, n_threads: int) -> None:
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.no_perf = True
        ctx = ll.llama_init_from_model(model.ptr, cp)
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.model = model
        self.ctx = ctx
        self.n_ctx: int = ll.llama_n_ctx(ctx)
        self.n_batch = n_batch
        self.mem = ll.llama_get_memory(ctx)
        self.cached: list[int] = []  # tokens whose keys/values the KV cache holds, in order
        self._one = (ll.llama_token * 1)()

    def _decode(self, tokens: list[int]) -> None:
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            arr = (ll.llama_token * len(chunk))(*chunk)
            rc = ll.llama_decode(self.ctx, ll.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                self.reset()
                raise RuntimeError(f"llama_decode failed with code {rc}")

    def reset(self) -> None:
        """Forget the KV cache (e.g. after an adapter swap)."""
        ll.llama_memory_clear(self.mem, True)
        self.cached = []

    def load_prompt(self, prompt: list[int]) -> int:
        """Evaluate `prompt`, reusing the cached prefix; returns how many tokens were reused."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(f"prompt has {len(prompt)} tokens; the context holds {self.n_ctx}")
        keep = min(common_prefix_len(self.cached, prompt), len(prompt) - 1)
        if keep < len(self.cached) and not ll.llama_memory_seq_rm(self.mem, 0, keep, -1):
            ll.llama_memory_clear(self.mem, True)
            keep = 0
        self.cached = prompt[:keep]
        try:
            self._decode(prompt[keep:])
        except RuntimeError:
            self.cached = []
            raise
        self.cached = list(prompt)
        return keep

    def generate(
        self,
        sampling: SamplingParams,
        max_tokens: int,
        on_token: Callable[[int], bool],
        stop: threading.Event,
        ignore_eos: bool = False,
    ) -> tuple[int, str]:
        """Sample up to `max_tokens` after a loaded prompt; `on_token` returns False to stop.

        Returns (tokens generated, finish reason: 'stop' for end-of-generation or a stop request, 'length').
        """
        smpl = make_sampler(sampling, self.model.n_vocab)
        ctx, one, cached = self.ctx, self._one, self.cached
        is_eog = (lambda _tok: False) if ignore_eos else self.model.is_eog
        room = self.n_ctx - len(cached)
        limit = min(max_tokens, room)
        n = 0
        finish = "length"
        try:
            while n < limit:
                tok = ll.llama_sampler_sample(smpl, ctx, -1)
                if is_eog(tok):
                    finish = "stop"
                    break
                n += 1
                if not on_token(tok) or stop.is_set():
                    finish = "stop"
                    break
                if n == limit:
                    break
                one[0] = tok
                if ll.llama_decode(ctx, ll.llama_batch_get_one(one, 1)) != 0:
                    self.reset()
                    raise RuntimeError("llama_decode failed during generation")
                cached.append(tok)
        finally:
            ll.llama_sampler_free(smpl)
        return n, finish

    def close(self) -> None:
        """Free the context."""
        if self.ctx:
            ll.llama_free(self.ctx)
            self.ctx = None


def make_sampler(p: SamplingParams, n_vocab: int) -> "ll.llama_sampler_p":
    """Build a llama.cpp sampler chain (penalties → top-k → top-p → min-p → temperature → draw)."""
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    add = ll.llama_sampler_chain_add
    if p.presence_penalty or p.frequency_penalty or p.repeat_penalty != 1.0:
        add(
            chain,
            ll.llama_sampler_init_penalties(n_vocab, 64, p.repeat_penalty, p.frequency_penalty, p.presence_penalty),
        )
    if p.temperature <= 0:
        add(chain, ll.llama_sampler_init_greedy())
        return chain
    if p.top_k > 0:
        add(chain, ll.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1.0:
        add(chain, ll.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0:
        add(chain, ll.llama_sampler_init_min_p(p.min_p, 1))
    add(chain, ll.llama_sampler_init_temp(p.temperature))
    seed = p.seed if p.seed is not None else ll.LLAMA_DEFAULT_SEED
    add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain
