"""The probe child: load a GGUF with llama.cpp's extra buffer types on or off, decode a fixed text, report.

Run as `python -m node.inference.probe MODEL --extra-buffers on|off --out LOGITS.npy`: a native crash (the AMX
kernel's SIGSEGV) kills this child, never the caller. The same tokens are teacher-forced in both modes (a prompt
decoded as one batch, then one token per decode: both matrix paths), so the two runs' logits are comparable
position by position. stdout carries one JSON line (`ProbeReport`); the logits go to `--out` (`.npy`, no pickle).
"""

import argparse
import ctypes
import faulthandler
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from node.core.faults import Fault, armed, crash_natively, disarm

PROMPT = "The quick brown fox jumps over the lazy dog. Rivers flow to the sea, and"
CONTINUATION = " the sea gives back the rain that feeds the rivers again."
EXIT_LOAD_FAILED = 3  # llama.cpp refused the file (not a crash)
_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s+([0-9.]+) MiB")


@dataclass
class ProbeReport:
    """What one probe child saw (the JSON line it prints)."""

    extra_buffers: bool
    extra_buffer_types: list[str]  # offered by this build on this CPU
    weight_buffers: dict[str, float]  # buffer type -> MiB of weights placed in it (e.g. CPU_Mapped, AMX)
    ftype: int
    positions: int
    decode_tok_s: float  # one token per decode, after the prompt
    system_info: str


def _capture_llama_log(lines: list[str]) -> object:
    """Route llama.cpp's log into `lines` (to see which buffer types the weights went to); keep the callback."""
    import llama_cpp as ll

    @ll.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    ll.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


def run_probe(model_path: Path, extra_buffers: bool, out: Path, threads: int) -> ProbeReport:
    """Load, decode the fixed text, write the logits of every continuation position to `out`."""
    import llama_cpp as ll

    from node.inference.llama_backend import BatchContext, LlamaModel, extra_buffer_types, system_info

    lines: list[str] = []
    keep = _capture_llama_log(lines)
    model = LlamaModel(model_path, extra_buffers=extra_buffers)
    ll.llama_log_set(ll._logger.llama_log_callback, ctypes.c_void_p(0))  # back to the binding's own handler
    del keep
    buffers = {m.group(1): float(m.group(2)) for line in lines if (m := _BUFFER_LINE.search(line))}
    print(json.dumps({"weight_buffers": buffers}), file=sys.stderr, flush=True)  # in the log, even if decoding dies
    prompt = model.tokenize(PROMPT, add_special=True, parse_special=False)
    forced = model.tokenize(CONTINUATION, add_special=False, parse_special=False)
    ctx = BatchContext(model, n_ctx_seq=256, n_seq=1, n_batch=64, n_threads=threads)
    if (extra_buffers and armed(Fault.PROBE_CRASH)) or armed(Fault.PROBE_CRASH_ALL):
        crash_natively()
    logits = np.empty((len(forced) + 1, model.n_vocab), dtype=np.float32)
    for i, tok in enumerate(prompt):
        ctx.add(tok, i, 0, i == len(prompt) - 1)
    ctx.decode()
    logits[0] = ctx.logits(-1)
    started = time.perf_counter()
    for j, tok in enumerate(forced):
        ctx.add(tok, len(prompt) + j, 0, True)
        ctx.decode()
        logits[j + 1] = ctx.logits(-1)
    tok_s = len(forced) / max(time.perf_counter() - started, 1e-9)
    if extra_buffers and armed(Fault.PROBE_WRONG):
        logits = logits[:, ::-1].copy()  # a kernel that answers, wrongly
    np.save(out, logits, allow_pickle=False)
    report = ProbeReport(
        extra_buffers=extra_buffers,
        extra_buffer_types=extra_buffer_types(),
        weight_buffers=buffers,
        ftype=model.ftype,
        positions=len(forced) + 1,
        decode_tok_s=round(tok_s, 1),
        system_info=system_info(),
    )
    ctx.close()
    model.close()
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of the probe child."""
    parser = argparse.ArgumentParser(prog="python -m node.inference.probe")
    parser.add_argument("model", type=Path)
    parser.add_argument("--extra-buffers", choices=["on", "off"], required=True)
    parser.add_argument("--out", type=Path, required=True, help="where to write the logits (.npy)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    faulthandler.enable(all_threads=True)  # a native crash leaves its traceback on stderr for the caller's log
    disarm(Fault.DECODE_CRASH)  # armed for the daemon's decode thread, not for the probe's decodes
    from node.inference.llama_backend import ModelLoadError

    try:
        report = run_probe(args.model, args.extra_buffers == "on", args.out, args.threads)
    except ModelLoadError as exc:
        print(exc, file=sys.stderr, flush=True)
        return EXIT_LOAD_FAILED
    print(json.dumps(asdict(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
