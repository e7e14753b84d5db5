"""Personalities: adapter load/switch vs a full model reload, memory of 1 base + 8 adapters vs 8 models,
generation with an adapter vs the base, training step time vs a plain peft loop, DP-SGD vs non-private.

Each measurement runs in a fresh Python process (memory and OpenMP thread state stay separate). Prints a table
and writes bench/results/personalities.json.

    .venv/bin/python bench/personalities.py [--threads 2] [--reps 3] [--train-steps 8] [--skip-training]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import extra_buffers, high_level_llama

ROOT = Path(__file__).resolve().parent.parent
N_ADAPTERS = 8


def rss_mb() -> float:
    """Resident set size of this process (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_adapters(folder: Path, n: int, targets: str) -> list[Path]:
    """n random r=8 adapters (q,v or all linear) of realistic size and effect, via the project's exporter."""
    import numpy as np

    from node.adapters.check import base_dims_of_file
    from node.inference.models import embedded_model_path
    from node.training.lora_export import LoraShape, write_gguf_lora

    dims = base_dims_of_file(embedded_model_path())
    e, kv, ff = dims.n_embd, dims.n_head_kv * dims.head_dim, dims.n_ff
    shapes = {"q_proj": (e, e), "v_proj": (kv, e)}
    if targets == "all":
        shapes |= {"k_proj": (kv, e), "o_proj": (e, e), "gate_proj": (ff, e), "up_proj": (ff, e), "down_proj": (e, ff)}
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        state = {}
        for layer in range(dims.n_layer):
            for mod, (out, inp) in shapes.items():
                part = "mlp" if mod.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
                key = f"base_model.model.model.layers.{layer}.{part}.{mod}"
                state[f"{key}.lora_A.weight"] = (rng.normal(size=(8, inp)) * 0.05).astype(np.float32)
                state[f"{key}.lora_B.weight"] = (rng.normal(size=(out, 8)) * 0.05).astype(np.float32)
        path = folder / f"adapter-{targets}-{i}.gguf"
        write_gguf_lora(path, state, LoraShape(dims.n_head, dims.n_head_kv, 16.0))
        paths.append(path)
    return paths


# ---- measurements, each run in its own process via `--one KIND` -------------------------------------------------


def m_swap(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Adapter load and switch (+ prompt re-evaluation) vs a full `Llama(..., lora_path=...)` load."""
    from node.inference.llama_backend import BatchContext, LlamaModel, LoraAdapter
    from node.inference.models import embedded_model_path

    paths = write_adapters(folder, N_ADAPTERS, "qv")
    model = LlamaModel(embedded_model_path(), extra_buffers=extra_buffers(embedded_model_path()))
    ctx = BatchContext(model, 512, 1, 64, args.threads)
    prompt = model.tokenize("The best way to plan a monthly budget is", True, False)
    loads, switches, reevals = [], [], []
    adapters = []
    for p in paths:
        t = time.perf_counter()
        adapters.append(LoraAdapter(model, p))
        loads.append(time.perf_counter() - t)
    for a in adapters * 2:
        t = time.perf_counter()
        ctx.set_adapters([(a, 1.0)])
        switches.append(time.perf_counter() - t)
        t = time.perf_counter()
        ctx.forget(0)
        for i, tok in enumerate(prompt):
            ctx.add(tok, i, 0, i == len(prompt) - 1)
        ctx.decode()
        reevals.append(time.perf_counter() - t)
    fulls = []
    for p in paths[:3]:
        t = time.perf_counter()
        llm = high_level_llama(
            embedded_model_path(), lora_path=str(p), n_ctx=512, n_threads=args.threads, verbose=False
        )
        llm.eval(prompt)
        fulls.append(time.perf_counter() - t)
        del llm
    return {
        "adapter_load_ms": 1e3 * statistics.median(loads),
        "switch_ms": 1e3 * statistics.median(switches),
        "prompt_reeval_ms": 1e3 * statistics.median(reevals),
        "full_reload_ms": 1e3 * statistics.median(fulls),
        "prompt_tokens": len(prompt),
    }


def m_rss_adapters(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """RSS of the base model with one context and 8 adapters loaded."""
    from node.inference.llama_backend import BatchContext, LlamaModel, LoraAdapter
    from node.inference.models import embedded_model_path

    paths = write_adapters(folder, N_ADAPTERS, "qv")
    before = rss_mb()
    model = LlamaModel(embedded_model_path(), extra_buffers=extra_buffers(embedded_model_path()))
    ctx = BatchContext(model, 512, 1, 64, args.threads)
    base = rss_mb()
    adapters = [LoraAdapter(model, p) for p in paths]
    ctx.set_adapters([(adapters[0], 1.0)])
    return {"rss_mb": rss_mb() - before, "base_only_mb": base - before, "n": len(adapters)}


def m_rss_models(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """RSS of 8 separately loaded models (no mmap sharing: what 8 single-purpose servers hold), one context each."""
    import llama_cpp as ll

    from node.inference.llama_backend import BatchContext, LlamaModel, model_params
    from node.inference.models import embedded_model_path

    before = rss_mb()
    held = []
    for _ in range(N_ADAPTERS):
        params = model_params(extra_buffers(embedded_model_path()))
        params.use_mmap = False
        m = LlamaModel.__new__(LlamaModel)
        m.ptr = ll.llama_model_load_from_file(str(embedded_model_path()).encode(), params)
        m.vocab = ll.llama_model_get_vocab(m.ptr)
        m.n_vocab = ll.llama_vocab_n_tokens(m.vocab)
        held.append((m, BatchContext(m, 512, 1, 64, args.threads)))
    return {"rss_mb": rss_mb() - before, "n": len(held)}


def m_generate(args: argparse.Namespace, folder: Path, targets: str | None) -> dict[str, Any]:
    """Generation tok/s through the node's engine, with no adapter or one adapter attached."""
    import trio

    from node.adapters.cache import AdapterRef
    from node.core.profiles import InferenceSettings
    from node.inference.engine import GenerationRequest, InferenceEngine
    from node.inference.llama_backend import LlamaModel, SamplingParams
    from node.inference.models import embedded_model_path

    refs: tuple[AdapterRef, ...] = ()
    if targets:
        path = write_adapters(folder, 1, targets)[0]
        refs = (AdapterRef("bench@v1", path),)
    model = LlamaModel(embedded_model_path(), extra_buffers=extra_buffers(embedded_model_path()))
    settings = InferenceSettings(
        profile="bench", threads=args.threads, n_ctx=512, max_tokens=256, batch_size=128, slots=1, adapter_cache_mb=64
    )
    prompt = model.tokenize("Write a long story about a lighthouse keeper and the sea.", True, False)

    async def main() -> float:
        engine = InferenceEngine(model, settings)
        rates = []
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            for _ in range(2):
                req = GenerationRequest(
                    prompt_tokens=prompt,
                    sampling=SamplingParams(temperature=0),
                    max_tokens=args.gen_tokens,
                    ignore_eos=True,
                    adapters=refs,
                )
                job = await engine.submit(req, 60)
                async for _ in job.text():
                    pass
                await job.done.wait()
                rates.append(job.stats.completion_tokens / job.stats.generate_s)
            nursery.cancel_scope.cancel()
        return max(rates)  # the first run warms the adapter load and OpenMP

    return {"tok_s": trio.run(main)}


def m_generate_beside_training(args: argparse.Namespace, folder: Path, nice: int) -> dict[str, Any]:
    """Generation tok/s while a training job (the node's own subprocess) runs at the given nice level."""
    from node.training.base_model import ensure_torch_base

    ensure_torch_base(Path(args.models_dir), _gguf())
    data = folder / "data.txt"
    data.write_text("\n\n".join(_train_texts(64)))
    spec = folder / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "gguf": str(_gguf()),
                "models_dir": args.models_dir,
                "data": str(data),
                "config": {"steps": 1000},
                "out_dir": str(folder / "out"),
            }
        )
    )
    job = subprocess.Popen(
        [sys.executable, "-m", "node.training.job", str(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    os.setpriority(os.PRIO_PROCESS, job.pid, nice)
    try:
        assert job.stdout is not None
        for line in job.stdout:  # wait until it is really training
            if json.loads(line)["event"] == "progress":
                break
        return m_generate(args, folder, None)
    finally:
        job.terminate()
        job.wait(timeout=30)


def m_train(args: argparse.Namespace, folder: Path, kind: str) -> dict[str, Any]:
    """Seconds per optimizer step: the project's trainer (plain or DP) vs a plain peft loop, same batch."""
    from node.training.base_model import ensure_torch_base

    base = ensure_torch_base(Path(args.models_dir), _gguf())
    texts = _train_texts(64)
    if kind == "peft":
        return {"s_per_step": _plain_peft_loop(base, texts, args)}
    from node.training.data import Example
    from node.training.trainer import DPConfig, TrainConfig, train_adapter

    steps: list[float] = []
    config = TrainConfig(
        targets="qv",
        steps=args.train_steps,
        batch_size=4,
        max_length=128,
        dp=DPConfig(epsilon=8.0) if kind == "dp" else None,
    )
    last = [time.perf_counter()]

    def progress(p: Any) -> None:
        now = time.perf_counter()
        steps.append(now - last[0])
        last[0] = now

    result = train_adapter(base, [Example(text=t) for t in texts], config, folder / f"out-{kind}", progress)
    timed = steps[1:] or steps  # the first step includes warm-up
    return {"s_per_step": statistics.median(timed), "epsilon": result.epsilon}


def _gguf() -> Path:
    from node.inference.models import embedded_model_path

    return embedded_model_path()


def _train_texts(n: int) -> list[str]:
    topics = ["budget", "savings", "tax", "investment", "pension", "mortgage", "insurance", "income"]
    verbs = ["plan", "review", "track", "compare", "reduce", "raise", "split", "check"]
    return [
        f"To {verbs[i % 8]} your {topics[(i * 3) % 8]}, start by listing every {topics[(i * 5) % 8]} item for "
        f"month {i % 12 + 1}, then {verbs[(i + 3) % 8]} the total against last year's {topics[(i + 1) % 8]}."
        for i in range(n)
    ]


def _plain_peft_loop(base: Path, texts: list[str], args: argparse.Namespace) -> float:
    """The reference: the shortest correct LoRA loop (peft q,v r=8, AdamW, batch 4 x <=128 tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from node.training.base_model import load_torch_base

    model, tok = load_torch_base(base)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    times = []
    for step in range(args.train_steps):
        batch = texts[(step * 4) % len(texts) : (step * 4) % len(texts) + 4]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=128)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        t = time.perf_counter()
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


# ---- driver --------------------------------------------------------------------------------------------------------


def one(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if kind == "swap":
            return m_swap(args, folder)
        if kind == "rss_adapters":
            return m_rss_adapters(args, folder)
        if kind == "rss_models":
            return m_rss_models(args, folder)
        if kind.startswith("gen_beside_training_nice"):
            return m_generate_beside_training(args, folder, int(kind.rsplit("nice", 1)[1]))
        if kind.startswith("gen_"):
            return m_generate(args, folder, None if kind == "gen_base" else kind[4:])
        if kind.startswith("train_"):
            return m_train(args, folder, kind[6:])
    raise ValueError(kind)


def isolated(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in a fresh Python process and return its JSON."""
    cmd = [
        sys.executable,
        __file__,
        "--one",
        kind,
        "--threads",
        str(args.threads),
        "--gen-tokens",
        str(args.gen_tokens),
        "--train-steps",
        str(args.train_steps),
        "--models-dir",
        args.models_dir,
    ]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, timeout=1800).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    """Run every measurement `--reps` times (interleaved), print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--only", help="comma-separated measurement kinds (for quick checks; no table)")
    ap.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "mirador-bench-models"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "personalities.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    kinds = ["swap", "rss_adapters", "rss_models", "gen_base", "gen_qv", "gen_all"]
    if not args.skip_training:
        kinds += ["train_peft", "train_ours", "train_dp", "gen_beside_training_nice19", "gen_beside_training_nice0"]
    if args.only:
        kinds = args.only.split(",")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for rep in range(args.reps):
        for kind in kinds:
            runs[kind].append(isolated(kind, args))
            print(f"rep {rep + 1}/{args.reps} {kind}: {runs[kind][-1]}", file=sys.stderr)
    if args.only:
        return

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    rows: list[tuple[str, str, str]] = []
    swap = {k: med("swap", k) for k in ("adapter_load_ms", "switch_ms", "prompt_reeval_ms", "full_reload_ms")}
    hot = swap["switch_ms"] + swap["prompt_reeval_ms"]
    rows.append(("full `Llama(lora_path=...)` load + prompt (reference)", f"{swap['full_reload_ms']:.1f} ms", "1.00"))
    rows.append(
        (
            "adapter load (`llama_adapter_lora_init`)",
            f"{swap['adapter_load_ms']:.2f} ms",
            f"{swap['adapter_load_ms'] / swap['full_reload_ms']:.3f}",
        )
    )
    rows.append(
        ("switch (`set_adapters`) + prompt re-evaluation", f"{hot:.1f} ms", f"{hot / swap['full_reload_ms']:.3f}")
    )
    rows.append(("  of which the switch call", f"{swap['switch_ms']:.3f} ms", ""))
    rss_a, rss_m = med("rss_adapters", "rss_mb"), med("rss_models", "rss_mb")
    rows.append((f"RSS: {N_ADAPTERS} separately loaded models (reference)", f"{rss_m:.0f} MB", "1.00"))
    rows.append((f"RSS: 1 base + {N_ADAPTERS} q,v adapters", f"{rss_a:.0f} MB", f"{rss_a / rss_m:.3f}"))
    base_tps = med("gen_base", "tok_s")
    rows.append(("generation, base (reference)", f"{base_tps:.1f} tok/s", "1.00"))
    for t in ("qv", "all"):
        tps = med(f"gen_{t}", "tok_s")
        rows.append((f"generation, {t} adapter attached", f"{tps:.1f} tok/s", f"{tps / base_tps:.3f}"))
    if not args.skip_training:
        for nice in (19, 0):
            tps = med(f"gen_beside_training_nice{nice}", "tok_s")
            rows.append(
                (f"generation, base, beside a training job at nice {nice}", f"{tps:.1f} tok/s", f"{tps / base_tps:.3f}")
            )
        peft_s, ours_s, dp_s = (med(f"train_{k}", "s_per_step") for k in ("peft", "ours", "dp"))
        rows.append(("training step, plain peft loop (reference)", f"{peft_s:.2f} s", "1.00"))
        rows.append(("training step, Mirador trainer (speed ratio)", f"{ours_s:.2f} s", f"{peft_s / ours_s:.3f}"))
        rows.append(
            ("training step, DP-SGD vs Mirador non-private (time ratio)", f"{dp_s:.2f} s", f"{dp_s / ours_s:.3f}")
        )
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measurement':<{width}}  {'value':>14}  ratio")
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>14}  {ratio}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "reps": args.reps, "machine": platform.platform(), "cpus": os.cpu_count()}
    args.out.write_text(json.dumps({"meta": meta, "runs": runs, "table": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
