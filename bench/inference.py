"""Inference speed: the node's HTTP API and engine against a bare llama.cpp loop, in one run.

Same GGUF, same thread count, same prompt length, greedy decoding with end-of-generation ignored so every path
generates exactly the same number of tokens. Prints a table and writes bench/results/inference.json.

    .venv/bin/python bench/inference.py [--threads 2] [--prompt-tokens 128] [--gen-tokens 128] [--reps 3]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import llama_cpp as ll
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import extra_buffers, high_level_llama
from node.core.profiles import InferenceSettings
from node.inference.engine import GenerationRequest, InferenceEngine
from node.inference.llama_backend import LlamaModel, SamplingParams
from node.inference.models import embedded_model_path

WORDS = [
    "river",
    "stone",
    "light",
    "orchard",
    "market",
    "lantern",
    "violin",
    "harbor",
    "meadow",
    "signal",
    "copper",
    "garden",
    "winter",
    "compass",
    "library",
    "thunder",
]


def make_prompt(model: LlamaModel, rep: int, n_tokens: int) -> tuple[str, list[int]]:
    """A prompt of exactly `n_tokens` tokens whose first token differs per repetition (no KV reuse)."""
    words = [WORDS[(rep * 7 + i) % len(WORDS)] for i in range(n_tokens * 2)]
    text = f"Story {rep}: " + " ".join(words)
    tokens = model.tokenize(text, add_special=True, parse_special=False)[:n_tokens]
    text = b"".join(model.piece(t) for t in tokens).decode("utf-8", errors="ignore")
    return text, model.tokenize(text, add_special=True, parse_special=False)


def bare_llama(model: LlamaModel, prompt: list[int], gen: int, threads: int, n_ctx: int) -> dict[str, float]:
    """Reference: the minimal low-level loop (llama_decode + C-side greedy sampler), no text handling."""
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, 1
    cp.n_threads = cp.n_threads_batch = threads
    ctx = ll.llama_init_from_model(model.ptr, cp)
    smpl = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    ll.llama_sampler_chain_add(smpl, ll.llama_sampler_init_greedy())
    arr = (ll.llama_token * len(prompt))(*prompt)
    one = (ll.llama_token * 1)()
    t0 = time.perf_counter()
    assert ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(prompt))) == 0
    tok = ll.llama_sampler_sample(smpl, ctx, -1)
    t1 = time.perf_counter()
    for _ in range(gen - 1):
        one[0] = tok
        assert ll.llama_decode(ctx, ll.llama_batch_get_one(one, 1)) == 0
        tok = ll.llama_sampler_sample(smpl, ctx, -1)
    t2 = time.perf_counter()
    ll.llama_sampler_free(smpl)
    ll.llama_free(ctx)
    return {"ttft_s": t1 - t0, "prompt_tps": len(prompt) / (t1 - t0), "gen_tps": (gen - 1) / (t2 - t1)}


def high_level(path: Path, prompt: str, gen: int, threads: int, n_ctx: int) -> dict[str, float]:
    """Context: llama-cpp-python's high-level `Llama` streaming API."""
    llm = high_level_llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    t0 = time.perf_counter()
    times = []
    for _ in llm.create_completion(prompt, max_tokens=gen, temperature=0, stream=True):
        times.append(time.perf_counter())
    n_prompt = len(llm.tokenize(prompt.encode()))
    llm.close()
    return _rates(t0, times, len(times), n_prompt)  # it may stop early at end-of-generation: count what came


def _rates(t0: float, times: list[float], gen: int, n_prompt: int) -> dict[str, float]:
    ttft = times[0] - t0
    return {"ttft_s": ttft, "prompt_tps": n_prompt / ttft, "gen_tps": (gen - 1) / (times[-1] - times[0])}


async def _engine_run(engine: InferenceEngine, prompt: list[int], gen: int) -> dict[str, float]:
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        req = GenerationRequest(
            prompt_tokens=prompt, sampling=SamplingParams(temperature=0), max_tokens=gen, stream=True, ignore_eos=True
        )
        t0 = time.perf_counter()
        job = await engine.submit(req, 60)
        times = [time.perf_counter() async for _ in job.text()]
        assert job.stats.completion_tokens == gen, job.stats
        nursery.cancel_scope.cancel()
    return _rates(t0, times, gen, len(prompt))


def engine_in_process(model: LlamaModel, prompt: list[int], gen: int, threads: int, n_ctx: int) -> dict[str, float]:
    """The node's engine, in-process, streaming (one text hand-off to the trio loop per token)."""
    settings = InferenceSettings(
        profile="bench", threads=threads, n_ctx=n_ctx, max_tokens=gen, batch_size=512, slots=1, adapter_cache_mb=1
    )
    engine = InferenceEngine(model, settings)
    out: dict[str, float] = trio.run(_engine_run, engine, prompt, gen)
    return out


def http_api(url: str, prompt: str, gen: int, n_prompt: int) -> dict[str, float]:
    """The daemon's HTTP API (a separate process), streamed SSE read by httpx."""
    body = {
        "model": "base",
        "prompt": prompt,
        "max_tokens": gen,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    times: list[float] = []
    usage: dict[str, int] = {}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            elif event["choices"] and event["choices"][0]["text"]:
                times.append(time.perf_counter())
    assert usage["completion_tokens"] == gen and usage["prompt_tokens"] == n_prompt, usage
    return _rates(t0, times, gen, n_prompt)


def http_concurrent(url: str, model: LlamaModel, rep: int, args: argparse.Namespace) -> float:
    """Aggregate generation tok/s of `SLOTS` streams started together (decoded in one batch by the engine)."""
    import threading

    spans: list[tuple[float, float]] = []

    def one_stream(i: int) -> None:
        text, tokens = make_prompt(model, 100 + rep * SLOTS + i, args.prompt_tokens)
        t0 = time.perf_counter()
        r = http_api(url, text, args.gen_tokens, len(tokens))
        spans.append((t0 + r["ttft_s"], time.perf_counter()))

    threads = [threading.Thread(target=one_stream, args=(i,)) for i in range(SLOTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = min(a for a, _ in spans), max(b for _, b in spans)
    return SLOTS * (args.gen_tokens - 1) / (end - start)


SLOTS = 2  # the balanced profile's slots


def start_daemon(threads: int, n_ctx: int, gen: int) -> tuple[subprocess.Popen[bytes], str, Path]:
    """A real daemon on a temporary home with the same threads and context, one slot."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="mirador-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRADOR_")} | {
        "MIRADOR_HOME": str(home),
        "MIRADOR_API_PORT": str(port),
        "MIRADOR_INFERENCE_THREADS": str(threads),
        "MIRADOR_INFERENCE_N_CTX": str(n_ctx),
        "MIRADOR_INFERENCE_MAX_TOKENS": str(gen),
        "MIRADOR_INFERENCE_BATCH_SIZE": "512",
        "MIRADOR_NODE_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "node", "start"], env=env, cwd=Path(__file__).resolve().parent.parent
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, home
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("daemon did not start")


def measure_isolated(kind: str, rep: int, args: argparse.Namespace) -> dict[str, float]:
    """Run one in-process measurement in a fresh Python process.

    llama.cpp's OpenMP runtime keeps a thread team per calling thread, and more teams than cores throttle each
    other; a fresh process per measurement keeps every path's threading state clean and equal.
    """
    cmd = [
        sys.executable,
        __file__,
        "--one",
        kind,
        "--rep",
        str(rep),
        "--threads",
        str(args.threads),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--gen-tokens",
        str(args.gen_tokens),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def one(kind: str, rep: int, args: argparse.Namespace) -> dict[str, float]:
    """One measurement of `kind` in this process."""
    path = embedded_model_path()
    model = LlamaModel(path, extra_buffers=extra_buffers(path))
    text, tokens = make_prompt(model, rep, args.prompt_tokens)
    if kind == "bare":
        return bare_llama(model, tokens, args.gen_tokens, args.threads, N_CTX)
    if kind == "engine":
        return engine_in_process(model, tokens, args.gen_tokens, args.threads, N_CTX)
    return high_level(path, text, args.gen_tokens, args.threads, N_CTX)


N_CTX = 1024


def main() -> None:
    """Run every path `reps` times, print medians and ratios, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "inference.json")
    ap.add_argument("--one", choices=["bare", "engine", "highlevel"], help=argparse.SUPPRESS)
    ap.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rep, args)))
        return
    path = embedded_model_path()
    model = LlamaModel(path, extra_buffers=extra_buffers(path))
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in ("bare", "engine", "http", "highlevel")}
    proc, url, _home = start_daemon(args.threads, N_CTX, args.gen_tokens)
    concurrent: list[float] = []
    try:
        for rep in range(args.reps):  # interleaved, so drift in machine speed hits every path alike
            for kind in ("bare", "engine", "highlevel"):
                runs[kind].append(measure_isolated(kind, rep, args))
            text, tokens = make_prompt(model, rep, args.prompt_tokens)
            runs["http"].append(http_api(url, text, args.gen_tokens, len(tokens)))
            concurrent.append(http_concurrent(url, model, rep, args))
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    ref = med["bare"]
    labels = {
        "bare": "bare llama.cpp loop (reference)",
        "engine": "node engine, in-process",
        "http": "node HTTP API (SSE, separate process)",
        "highlevel": "llama-cpp-python Llama (high-level)",
    }
    print(
        f"\nSmolLM2-135M-Instruct Q4_1, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
        f"{args.gen_tokens} generated, median of {args.reps}"
    )
    print(f"{'path':42} {'gen tok/s':>10} {'ratio':>6} {'prompt tok/s':>13} {'ratio':>6} {'TTFT ms':>8}")
    for k, m in med.items():
        print(
            f"{labels[k]:42} {m['gen_tps']:10.1f} {m['gen_tps'] / ref['gen_tps']:6.3f} "
            f"{m['prompt_tps']:13.1f} {m['prompt_tps'] / ref['prompt_tps']:6.3f} {m['ttft_s'] * 1000:8.1f}"
        )
    agg = statistics.median(concurrent)
    print(
        f"{'node HTTP API, ' + str(SLOTS) + ' concurrent streams (sum)':42} {agg:10.1f} "
        f"{agg / ref['gen_tps']:6.3f}   (batched decoding: both sequences in one llama_decode per step)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "model": path.name,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "reps": args.reps,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "median": med,
        "runs": runs,
        "ratios": {
            k: {"gen": m["gen_tps"] / ref["gen_tps"], "prompt": m["prompt_tps"] / ref["prompt_tps"]}
            for k, m in med.items()
        },
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
