"""A thin, fast layer over llama.cpp's low-level C API (llama-cpp-python's ctypes binding).

The per-token loop stays in C as much as possible: sampling runs in llama.cpp's sampler chain (no copy of the
49k-logit vector into Python), and each generated token costs one `llama_sampler_sample` call, one
`llama_decode` call and a dict lookup for its text. Every call here blocks: callers run them in worker threads.
"""

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as ll
import numpy as np
from llama_cpp import _logger as ll_logger

from node.core.faults import Fault, armed, crash_natively

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
    grammar: str | None = None  # GBNF (root rule `root`): only tokens that keep the text inside it are drawn


def model_params(extra_buffers: bool) -> ll.llama_model_params:
    """llama.cpp's model parameters for CPU inference, with its extra buffer types (weight repacking: AMX,
    CPU_REPACK, ...) on or off. Every GGUF load goes through here, so one choice holds everywhere."""
    params = ll.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = extra_buffers
    return params


def extra_buffer_types() -> list[str]:
    """Names of the extra buffer types the CPU backend of this llama.cpp build offers on this CPU (e.g. AMX).

    Read through ggml's backend registry with ctypes; listing them allocates and computes nothing.
    """
    _init_backend(False)
    lib = Path(ll.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(lib / "libggml.so"))
    base = ctypes.CDLL(str(lib / "libggml-base.so"))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    device = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not device:
        return []
    proc = base.ggml_backend_reg_get_proc_address(
        ggml.ggml_backend_dev_backend_reg(device), b"ggml_backend_dev_get_extra_bufts"
    )
    if not proc:
        return []
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(proc)(device)
    names: list[str] = []
    i = 0
    while bufts and bufts[i]:
        names.append(base.ggml_backend_buft_name(bufts[i]).decode())
        i += 1
    return names


def system_info() -> str:
    """llama.cpp's `llama_print_system_info()`: the CPU features this build uses."""
    _init_backend(False)
    return ll.llama_print_system_info().decode("utf-8", errors="replace").strip()


class LlamaModel:
    """One loaded GGUF model: weights, vocabulary, chat template, token texts.

    `extra_buffers` is the node's one choice of llama.cpp's extra buffer types (node.inference.extra_buffers):
    on some CPUs their kernels crash or answer wrongly, so it is never left to llama.cpp's default.
    """

    def __init__(self, path: Path, *, extra_buffers: bool, verbose: bool = False) -> None:
        _init_backend(verbose)
        ptr = ll.llama_model_load_from_file(str(path).encode(), model_params(extra_buffers))
        if not ptr:
            raise ModelLoadError(f"llama.cpp could not load {path} (not a GGUF model, or unsupported)")
        self.path = Path(path)
        self.extra_buffers = extra_buffers
        self.ptr = ptr
        self.vocab = ll.llama_model_get_vocab(ptr)
        self.n_vocab: int = ll.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = ll.llama_model_n_ctx_train(ptr)
        self.n_params: int = ll.llama_model_n_params(ptr)
        self.size_bytes: int = ll.llama_model_size(ptr)
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)

    @property
    def ftype(self) -> int:
        """llama.cpp's file type (`llama_ftype`): 2 = Q4_0, 3 = Q4_1, ..."""
        return int(ll.llama_model_ftype(self.ptr))

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


class AdapterLoadError(Exception):
    """llama.cpp refused a LoRA adapter file."""


class LoraAdapter:
    """A GGUF LoRA adapter loaded against one model; attach it to contexts with `BatchContext.set_adapters`."""

    def __init__(self, model: "LlamaModel", path: Path) -> None:
        ptr = ll.llama_adapter_lora_init(model.ptr, str(path).encode())
        if not ptr:
            raise AdapterLoadError(f"llama.cpp could not load the LoRA adapter {path}")
        self.path = Path(path)
        self.ptr = ptr

    def close(self) -> None:
        """Free the adapter (detach it from every context first)."""
        if self.ptr:
            ll.llama_adapter_lora_free(self.ptr)
            self.ptr = None


class DecodeError(RuntimeError):
    """llama_decode failed; the sequences in that batch are reset."""


class BatchContext:
    """One llama.cpp context holding `n_seq` independent sequences (each its own KV cache), decoded together.

    Tokens of several sequences go into one `llama_decode` call (continuous batching): for a small model,
    decoding two sequences' next tokens costs little more than one.
    """

    def __init__(self, model: LlamaModel, n_ctx_seq: int, n_seq: int, n_batch: int, n_threads: int) -> None:
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx_seq * n_seq
        cp.n_seq_max = n_seq
        cp.kv_unified = False
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.no_perf = True
        # Flash attention off: llama.cpp's CPU flash attention gives a token different numbers (logits up to 0.6
        # apart) depending on how many tokens share its batch, so a prompt evaluated in other chunks (a reused
        # prefix, a chain's hand-off, a busier batch) could change greedy text. Without it every chunking and batch
        # gives bit-identical logits, at the same memory and faster decoding here (docs/BENCHMARKS.md).
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = ll.llama_init_from_model(model.ptr, cp)
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not create a context of {n_seq} x {n_ctx_seq} tokens")
        self.model = model
        self.ctx = ctx
        self.n_seq = n_seq
        self.n_ctx_seq: int = ll.llama_n_ctx_seq(ctx)
        self.n_batch = n_batch
        self.mem = ll.llama_get_memory(ctx)
        self.batch = ll.llama_batch_init(n_batch, 0, 1)
        self.n_tokens = 0
        self._crash = armed(Fault.DECODE_CRASH)  # read once: decode is the per-token path

    @property
    def room(self) -> int:
        """Tokens that still fit in the batch being built."""
        return self.n_batch - self.n_tokens

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token of sequence `seq` at position `pos`; returns its index in the batch."""
        b, i = self.batch, self.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        self.n_tokens = i + 1
        return i

    def decode(self) -> None:
        """Evaluate the batch built so far and start a new one."""
        self.batch.n_tokens = self.n_tokens
        self.n_tokens = 0
        if self._crash:
            crash_natively()
        rc = ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise DecodeError(f"llama_decode failed with code {rc}")

    def sample(self, sampler: "Sampler", index: int) -> int:
        """Sample the token after batch position `index` (accepting it into the sampler's state)."""
        return sampler.sample(self.ctx, index)

    def set_adapters(self, adapters: list[tuple[LoraAdapter, float]]) -> None:
        """Attach exactly these adapters with these scales (an empty list detaches all); the KV cache is untouched."""
        n = len(adapters)
        if n == 0:
            rc = ll.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            ptrs = (ll.llama_adapter_lora_p_ctypes * n)(*[a.ptr for a, _ in adapters])
            scales = (ctypes.c_float * n)(*[s for _, s in adapters])
            rc = ll.llama_set_adapters_lora(self.ctx, ptrs, n, scales)
        if rc != 0:
            raise AdapterLoadError(f"llama_set_adapters_lora failed with code {rc}")

    def logits(self, index: int) -> "np.ndarray":
        """A copy of the logits of batch position `index` of the last decode (-1 = the last one)."""
        ptr = ll.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def forget(self, seq: int, from_pos: int = 0) -> None:
        """Drop sequence `seq`'s cached positions from `from_pos` on (all of them by default)."""
        if not ll.llama_memory_seq_rm(self.mem, seq, from_pos, -1):
            ll.llama_memory_seq_rm(self.mem, seq, 0, -1)

    def close(self) -> None:
        """Free the batch and the context."""
        if self.ctx:
            ll.llama_batch_free(self.batch)
            ll.llama_free(self.ctx)
            self.ctx = None


class GrammarError(ValueError):
    """llama.cpp could not parse a GBNF grammar."""


def grammar_sampler(vocab: "ll.llama_vocab_p", grammar: str) -> "ll.llama_sampler_p":
    """llama.cpp's grammar sampler for `grammar` (GrammarError if it does not parse)."""
    sampler = ll.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise GrammarError("llama.cpp could not parse the grammar")
    return sampler


def _chain(p: SamplingParams, n_vocab: int) -> "ll.llama_sampler_p":
    """llama.cpp's sampler chain (penalties → top-k → top-p → min-p → temperature → draw), no grammar."""
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


_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


class Sampler:
    """One generation's sampler. Without a grammar: llama.cpp's chain, all in C (`llama_sampler_sample`). With one:
    llama.cpp's own fast path (common/sampling.cpp): draw with the chain, check only the drawn token against the
    grammar, and only when it is refused apply the grammar to the whole vocabulary and draw again. The grammar sampler
    alone checks all 49k candidates at every token (measured: 0.2-0.4x the speed of free generation)."""

    def __init__(self, p: SamplingParams, n_vocab: int, vocab: "ll.llama_vocab_p | None" = None) -> None:
        self.chain = _chain(p, n_vocab)
        self.grammar: ll.llama_sampler_p | None = None
        self.n_vocab = n_vocab
        self.resampled = 0  # tokens the chain drew that the grammar refused
        if p.grammar is None:
            return
        if vocab is None:
            ll.llama_sampler_free(self.chain)
            raise GrammarError("a grammar needs the model's vocabulary")
        try:
            self.grammar = grammar_sampler(vocab, p.grammar)
        except GrammarError:
            ll.llama_sampler_free(self.chain)
            raise
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._all = ll.llama_token_data_array(
            data=self._data.ctypes.data_as(ctypes.POINTER(ll.llama_token_data)), size=n_vocab, selected=-1, sorted=False
        )
        self._one_data = np.zeros(1, dtype=_TOKEN_DATA)
        self._one = ll.llama_token_data_array(
            data=self._one_data.ctypes.data_as(ctypes.POINTER(ll.llama_token_data)), size=1, selected=-1, sorted=False
        )

    def _fill(self, logits: np.ndarray) -> None:
        self._data["id"] = self._ids
        self._data["logit"] = logits
        self._data["p"] = 0.0
        self._all.size, self._all.selected, self._all.sorted = self.n_vocab, -1, False

    def sample(self, ctx: "ll.llama_context_p", index: int) -> int:
        """The next token after batch position `index`, accepted into the sampler's state."""
        if self.grammar is None:
            return int(ll.llama_sampler_sample(self.chain, ctx, index))
        ptr = ll.llama_get_logits_ith(ctx, index)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        self._fill(logits)
        ll.llama_sampler_apply(self.chain, ctypes.byref(self._all))
        token = int(self._data["id"][self._all.selected])
        self._one_data[0] = (token, logits[token], 0.0)
        self._one.size, self._one.selected, self._one.sorted = 1, -1, False
        ll.llama_sampler_apply(self.grammar, ctypes.byref(self._one))
        if not np.isfinite(self._one_data["logit"][0]):  # refused: the grammar first, over every token
            self.resampled += 1
            self._fill(logits)
            ll.llama_sampler_apply(self.grammar, ctypes.byref(self._all))
            ll.llama_sampler_apply(self.chain, ctypes.byref(self._all))
            token = int(self._data["id"][self._all.selected])
        ll.llama_sampler_accept(self.grammar, token)
        ll.llama_sampler_accept(self.chain, token)
        return token

    def free(self) -> None:
        """Free the C samplers."""
        ll.llama_sampler_free(self.chain)
        if self.grammar is not None:
            ll.llama_sampler_free(self.grammar)
            self.grammar = None


def make_sampler(p: SamplingParams, n_vocab: int, vocab: "ll.llama_vocab_p | None" = None) -> Sampler:
    """A generation's sampler; a grammar needs the model's `vocab` (GrammarError if it does not parse)."""
    return Sampler(p, n_vocab, vocab)


def free_sampler(sampler: Sampler) -> None:
    """Free a sampler made by `make_sampler`."""
    sampler.free()
