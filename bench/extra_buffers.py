"""llama.cpp's extra buffer types (weight repacking) on vs off, and what the node's probe costs, in one run.

For the embedded SmolLM2 (Q4_1) and the same model requantized to Q4_0 by llama.cpp (a format its CPU_REPACK
buffer takes on x86 and arm64), each mode runs in a fresh probe child (`node.inference.probe`: the same fixed text,
prompt as one batch, then one token per decode); the reference is the plain CPU path (extra buffers off) measured
alternately with it. Also timed: the node's `auto` choice cold (two children) and cached. Prints a table and writes
bench/results/extra_buffers.json.

    .venv/bin/python bench/extra_buffers.py [--reps 5] [--threads 2]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import positive_int, run_header, write_json
from node.inference.extra_buffers import choose
from node.inference.llama_backend import extra_buffer_types
from node.inference.models import embedded_model_path


def requantize_q4_0(out: Path) -> Path:
    """The embedded model requantized to Q4_0 by llama.cpp."""
    import llama_cpp as ll

    params = ll.llama_model_quantize_default_params()
    params.ftype = 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    if ll.llama_model_quantize(str(embedded_model_path()).encode(), str(out).encode(), params) != 0:
        raise RuntimeError("llama.cpp could not requantize the embedded model")
    return out


def probe_child(model: Path, mode: str, threads: int, folder: Path) -> dict[str, Any]:
    """One probe child's report."""
    cmd = [sys.executable, "-m", "node.inference.probe", str(model), "--extra-buffers", mode, "--threads", str(threads)]
    done = subprocess.run([*cmd, "--out", str(folder / "logits.npy")], capture_output=True, text=True, check=True)
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def measure(model: Path, reps: int, threads: int, folder: Path) -> dict[str, Any]:
    """Decode tok/s with extra buffers on and off (alternating), medians, and where the weights went."""
    runs: dict[str, list[float]] = {"on": [], "off": []}
    placed: dict[str, dict[str, float]] = {}
    for _ in range(reps):
        for mode in ("off", "on"):
            report = probe_child(model, mode, threads, folder)
            runs[mode].append(report["decode_tok_s"])
            placed[mode] = report["weight_buffers"]
    on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
    return {"on_tok_s": on, "off_tok_s": off, "ratio": on / off, "runs": runs, "weight_buffers": placed}


def main() -> None:
    """Measure, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "extra_buffers.json")
    args = ap.parse_args()
    result: dict[str, Any] = run_header("llama-cpp-python") | {"extra_buffer_types": extra_buffer_types()}
    with tempfile.TemporaryDirectory(prefix="mirador-bench-") as tmp:
        folder = Path(tmp)
        q4_0 = requantize_q4_0(folder / "q40.gguf")
        models = {"SmolLM2 Q4_1 (embedded)": embedded_model_path(), "SmolLM2 Q4_0": q4_0}
        result["models"] = {name: measure(path, args.reps, args.threads, folder) for name, path in models.items()}
        cache = folder / "cache.json"
        started = time.perf_counter()
        verdict = choose(embedded_model_path(), "auto", cache)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        choose(embedded_model_path(), "auto", cache)
        cached = time.perf_counter() - started
    result["probe"] = {"cold_s": cold, "cached_s": cached, "verdict": verdict.describe()}
    write_json(args.out, result)
    print(f"extra buffer types offered: {', '.join(result['extra_buffer_types']) or 'none'}; {args.threads} threads")
    print(f"{'model':28} {'off tok/s (ref)':>16} {'on tok/s':>9} {'ratio':>6}  weights in extra buffers (on)")
    for name, m in result["models"].items():
        extra = {k: v for k, v in m["weight_buffers"]["on"].items() if k not in {"CPU", "CPU_Mapped"}}
        where = ", ".join(f"{k} {v:g} MiB" for k, v in extra.items()) or "none"
        print(f"{name:28} {m['off_tok_s']:16.1f} {m['on_tok_s']:9.1f} {m['ratio']:6.2f}  {where}")
    print(f"probe (auto, embedded model): cold {cold:.2f} s, cached {cached * 1e3:.0f} ms; {verdict.describe()}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
