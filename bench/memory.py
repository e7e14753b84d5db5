"""Memory: retrieval quality, retrieval latency at 10k and 100k memories, ingest rate, and the chat TTFT cost of
injecting memories (`bash scripts/install.sh --bench` installs Debian's fortunes, the labelled data).

Quality: each fortunes entry (>= 16 words) is cut in two halves; every first half is stored as a memory (over 8,000
of them), and the second halves of a random sample are the queries: the right answer to a query is the memory of its
own entry. recall@5 and MRR@10 for dense, BM25, hybrid (RRF), hybrid + decay (memories given random ages of 0-365
days: the labels do not depend on age, so decay can only cost), and hybrid + decay + MMR (what chats use).

Latency (the real embedded store, `node.memory.edge`): searches of a namespace of 10k and 100k memories, without
and with the embedding of the query, before and after the namespace's HNSW index is built (the node builds it in a
child process once 20k memories are unindexed). 10k and 100k are the real fortunes vectors plus copies with a little
noise (sigma 0.05 per dimension, renormalised) and their texts with a number appended. The reference, measured in the
same run: an exact numpy top-k over the same vectors (brute force, float32 matrix-vector product).

Ingest: memories/s through `MemoryService.add` (embedding + store) against embedding alone.

TTFT (a one-token answer: prompt evaluation, one decode, HTTP): a real daemon whose namespace holds the fortunes
memories; chats of one token, greedy: without memory, with memory (recall + the injected block); then the same
final prompt pasted by the client and the memory chat again, both with the prompt already in the engine's cache:
their difference is the cost of recall itself (embedding the question, searching, marking the memories used).

Layout (--layout): 10 namespaces of 10k random vectors, as one shard per namespace or as one shard with a namespace
field (a keyword index marked as tenant, filtered on every query), both indexed: dense top-5 latency, index build.

    python bench/memory.py [--queries 500] [--trials 20] [--skip-100k] [--layout]
"""

import argparse
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import FORTUNES_DIR, INSTALL_HINT, positive_int, read_fortunes, run_header, write_json

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0


def halves(folder: Path, min_words: int = 16) -> list[tuple[str, str]]:
    """(first half, second half) of every fortunes entry with at least `min_words` words, de-duplicated."""
    if not folder.is_dir():
        sys.exit(f"fortunes not found in {folder}: install them with {INSTALL_HINT}")
    seen: set[str] = set()
    out = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.suffix):
        for entry in read_fortunes(path):
            words = entry.split()
            if len(words) < min_words or entry in seen:
                continue
            seen.add(entry)
            cut = len(words) // 2
            out.append((" ".join(words[:cut]), " ".join(words[cut:])))
    return out


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50_ms": round(pick(0.5), 3), "p99_ms": round(pick(0.99), 3)}


def quality(service: Any, pairs: list[tuple[str, str]], ids: list[str], sample: list[int]) -> list[dict[str, Any]]:
    """recall@5 and MRR@10 of every retrieval variant over the sampled queries."""
    variants = [
        ("dense", {"mode": "dense", "decay": False, "diverse": False}),
        ("bm25", {"mode": "bm25", "decay": False, "diverse": False}),
        ("hybrid", {"mode": "hybrid", "decay": False, "diverse": False}),
        ("hybrid + decay", {"mode": "hybrid", "decay": True, "diverse": False}),
        ("hybrid + decay + mmr", {"mode": "hybrid", "decay": True, "diverse": True}),
    ]
    rows = []
    for name, options in variants:
        hits5 = 0
        reciprocal = 0.0
        for i in sample:
            found = [h.memory.id for h in service.search("fortunes", pairs[i][1], 10, **options)]
            rank = found.index(ids[i]) + 1 if ids[i] in found else None
            hits5 += rank is not None and rank <= 5
            reciprocal += 1.0 / rank if rank else 0.0
        rows.append({"variant": name, "recall@5": hits5 / len(sample), "mrr@10": reciprocal / len(sample)})
    return rows


def grown(vectors: np.ndarray, texts: list[str], size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """`size` vectors and texts: the real ones, then noisy copies of them."""
    reps = -(-size // len(vectors))
    base = np.tile(vectors, (reps, 1))[:size]
    noise = rng.standard_normal(base.shape).astype(np.float32) * 0.05
    noise[: len(vectors)] = 0
    out = base + noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    names = [f"{texts[i % len(texts)]} ({i // len(texts)})" if i >= len(texts) else texts[i] for i in range(size)]
    return out, names


def latency(
    embedder: Any, vectors: np.ndarray, texts: list[str], queries: list[str], size: int, work: Path, seed: int
) -> dict[str, Any]:
    """Search latency at `size` memories: store (before/after the index), store + embedding, numpy reference."""
    from node.memory.backend import Search
    from node.memory.edge import EdgeBackend
    from node.memory.record import Memory

    rng = np.random.default_rng(seed)
    matrix, names = grown(vectors, texts, size, rng)
    root = work / f"latency-{size}"
    backend = EdgeBackend(root, matrix.shape[1])
    now = time.time()
    started = time.perf_counter()
    for start in range(0, size, 2000):
        batch = [
            Memory(id=str(uuid.uuid4()), namespace="n", text=t, kind="note", created=now, last_used=now)
            for t in names[start : start + 2000]
        ]
        backend.upsert(batch, matrix[start : start + 2000])
    upsert_s = time.perf_counter() - started
    qvecs = embedder.embed(queries)

    def timed(with_embedding: bool) -> dict[str, float]:
        samples = []
        for q, v in zip(queries, qvecs, strict=True):
            t0 = time.perf_counter()
            vec = embedder.embed([q])[0] if with_embedding else v
            backend.query("n", Search(vector=vec.tolist(), text=q, limit=5, half_life_s=30 * DAY, now=now))
            samples.append(time.perf_counter() - t0)
        return percentiles(samples)

    def reference() -> dict[str, float]:
        samples = []
        for v in qvecs:
            t0 = time.perf_counter()
            scores = matrix @ v
            np.argpartition(-scores, 5)[:5]
            samples.append(time.perf_counter() - t0)
        return percentiles(samples)

    row: dict[str, Any] = {"memories": size, "upsert_s": round(upsert_s, 2), "numpy_exact": reference()}
    row["unindexed"] = {"store": timed(False), "store+embedding": timed(True)}
    started = time.perf_counter()
    indexed = backend.index("n")
    row["index_build_s"] = round(time.perf_counter() - started, 1)
    row["indexed"] = {"store": timed(False), "store+embedding": timed(True)} if indexed else None
    backend.close()
    shutil.rmtree(root, ignore_errors=True)
    return row


def layout(work: Path, seed: int, namespaces: int = 10, per: int = 10_000) -> dict[str, Any]:
    """The choice of store layout: one shard per namespace vs one shard with a namespace field (a keyword index
    marked as tenant, the filter on every query); random unit vectors, both indexed; dense top-5 latency."""
    from qdrant_edge import (
        Distance,
        EdgeConfig,
        EdgeShard,
        EdgeVectorParams,
        FieldCondition,
        Filter,
        KeywordIndexParams,
        MatchValue,
        Point,
        Query,
        QueryRequest,
        UpdateOperation,
    )

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((namespaces * per, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def config() -> EdgeConfig:
        return EdgeConfig(vectors={"d": EdgeVectorParams(size=384, distance=Distance.Cosine)}, max_search_threads=1)

    def points(lo: int, hi: int, tagged: bool) -> list[Point]:
        return [
            Point(str(uuid.uuid4()), {"d": vectors[i].tolist()}, {"ns": f"n{i // per}"} if tagged else {})
            for i in range(lo, hi)
        ]

    (work / "one").mkdir()
    one = EdgeShard.create(str(work / "one"), config())
    one.update(UpdateOperation.create_field_index("ns", KeywordIndexParams(is_tenant=True)))
    for start in range(0, len(vectors), 5000):
        one.update(UpdateOperation.upsert_points(points(start, start + 5000, True)))
    t0 = time.perf_counter()
    one.optimize()
    one_s = time.perf_counter() - t0
    shards = []
    t0 = time.perf_counter()
    for k in range(namespaces):
        (work / f"n{k}").mkdir()
        shard = EdgeShard.create(str(work / f"n{k}"), config())
        shard.update(UpdateOperation.upsert_points(points(k * per, (k + 1) * per, False)))
        shard.optimize()
        shards.append(shard)
    per_s = time.perf_counter() - t0

    def timed(search: Any) -> dict[str, float]:
        samples = []
        for _ in range(300):
            q = rng.standard_normal(384)
            q /= np.linalg.norm(q)
            k = int(rng.integers(namespaces))
            t0 = time.perf_counter()
            search(q.tolist(), k)
            samples.append(time.perf_counter() - t0)
        return percentiles(samples)

    filtered = timed(
        lambda q, k: one.query(
            QueryRequest(
                limit=5,
                query=Query.Nearest(q, using="d"),
                filter=Filter(must=[FieldCondition(key="ns", match=MatchValue(f"n{k}"))]),
            )
        )
    )
    separate = timed(lambda q, k: shards[k].query(QueryRequest(limit=5, query=Query.Nearest(q, using="d"))))
    for shard in [one, *shards]:
        shard.close()
    return {
        "namespaces": namespaces,
        "per_namespace": per,
        "one_shard_with_filter": filtered | {"index_build_s": round(one_s, 1)},
        "shard_per_namespace": separate | {"index_build_s": round(per_s, 1)},
    }


def ttft(pairs: list[tuple[str, str]], memory_root: Path, trials: int, work: Path) -> dict[str, Any]:
    """Median time to first token of streamed chats without memory, with memory, and with the block pasted in."""
    import httpx
    import msgspec

    from node.memory.record import Memory
    from node.memory.service import HEADER, memory_line
    from tests.daemon_harness import start_daemon

    FIELDS = Memory.__struct_fields__

    home = work / "ttft-home"
    home.mkdir(parents=True)
    shutil.copytree(memory_root, home / "memory")
    daemon = start_daemon(home)
    questions = [pairs[i][1] for i in range(trials)]
    times: dict[str, list[float]] = {
        "no memory": [],
        "memory": [],
        "pasted, prompt cached": [],
        "memory, prompt cached": [],
    }
    injected_tokens = []
    same_prompt = 0
    try:

        def first_token(body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
            """Seconds to a one-token answer (prompt evaluation + one decode + HTTP), and the answer."""
            t0 = time.perf_counter()
            resp = httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=120)
            elapsed = time.perf_counter() - t0
            resp.raise_for_status()
            return elapsed, resp.json()

        for q in questions:
            base = {"model": "base", "max_tokens": 1, "temperature": 0, "namespace": "fortunes"}
            user = [{"role": "user", "content": q}]
            elapsed, _ = first_token(base | {"messages": user, "memory": False})
            times["no memory"].append(elapsed)
            elapsed, head = first_token(base | {"messages": user})
            times["memory"].append(elapsed)
            ids = head.get("memory", {}).get("ids", [])
            by_id = {}
            for i in ids:  # the memories the chat used, as stored (their text, kind and day)
                m = httpx.get(f"{daemon.url}/v1/memory/{i}", params={"namespace": "fortunes"}, headers=daemon.auth)
                by_id[i] = msgspec.convert({k: m.json()[k] for k in FIELDS}, Memory)
            block = "\n".join([HEADER, *(memory_line(by_id[i]) for i in ids)]) if ids else ""
            injected_tokens.append(len(block.split()))
            pasted = [{"role": "system", "content": block}, *user] if block else user
            # the same final prompt again: the engine reuses the cached prompt, so both are cheap to evaluate and
            # what is left between them is the cost of recall itself
            elapsed, _ = first_token(base | {"messages": pasted, "memory": False})
            times["pasted, prompt cached"].append(elapsed)
            elapsed, again = first_token(base | {"messages": user})
            times["memory, prompt cached"].append(elapsed)
            same_prompt += again["usage"]["prompt_tokens"] == head["usage"]["prompt_tokens"]
    finally:
        daemon.stop()
    median = {k: float(np.median(v)) * 1000 for k, v in times.items()}
    return {
        "trials": trials,
        "median_ms": {k: round(v, 1) for k, v in median.items()},
        "overhead_vs_no_memory": round(median["memory"] / median["no memory"] - 1, 3),
        "recall_ms": round(median["memory, prompt cached"] - median["pasted, prompt cached"], 1),
        "overhead_of_recall": round(
            (median["memory, prompt cached"] - median["pasted, prompt cached"]) / median["no memory"], 3
        ),
        "injected_words_median": float(np.median(injected_tokens)),
        "recalled_the_same_again": same_prompt,
    }


def main() -> None:
    """Measure, print the tables, write bench/results/memory.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fortunes-dir", type=Path, default=FORTUNES_DIR)
    ap.add_argument("--queries", type=positive_int, default=500, help="labelled queries for recall/MRR")
    ap.add_argument("--latency-queries", type=positive_int, default=200)
    ap.add_argument("--trials", type=positive_int, default=20, help="chats per TTFT variant")
    ap.add_argument("--skip-100k", action="store_true", help="latency at 10k only")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--layout", action="store_true", help="also compare the store layouts (~2 min)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    args = ap.parse_args()

    from node.core.config import MemorySection
    from node.memory.edge import EdgeBackend
    from node.memory.embedder import Embedder
    from node.memory.record import Memory
    from node.memory.service import MemoryService, NewMemory

    result: dict[str, Any] = run_header("qdrant-edge-py", "llama_cpp_python")
    pairs = halves(args.fortunes_dir)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="mirador-bench-memory-"))
    try:
        embedder = Embedder(work / "embed")
        root = work / "memory"
        service = MemoryService(root, work, MemorySection(), EdgeBackend(root, Embedder.dimensions), embedder)
        # ingest: embedding alone, then embedding + store, over the same first 1,000 halves
        probe = [a for a, _ in pairs[:1000]]
        t0 = time.perf_counter()
        embedder.embed(probe)
        embed_rate = len(probe) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        service.add("ingest", [NewMemory(text=t) for t in probe])
        add_rate = len(probe) / (time.perf_counter() - t0)
        result["ingest"] = {"memories_per_s": round(add_rate, 1), "embedding_alone_per_s": round(embed_rate, 1)}
        result["ingest"]["ratio_to_embedding_alone"] = round(add_rate / embed_rate, 3)
        # the labelled namespace: random ages of 0-365 days
        vectors = embedder.embed([a for a, _ in pairs])
        now = time.time()
        memories = []
        for a, _ in pairs:
            age = rng.uniform(0, 365) * DAY
            memories.append(
                Memory(
                    id=str(uuid.uuid4()),
                    namespace="fortunes",
                    text=a,
                    kind="note",
                    created=now - age,
                    last_used=now - age,
                )
            )
        for start in range(0, len(memories), 2000):
            service.backend.upsert(memories[start : start + 2000], vectors[start : start + 2000])
        sample = rng.sample(range(len(pairs)), min(args.queries, len(pairs)))
        result["quality"] = {
            "memories": len(pairs),
            "queries": len(sample),
            "rows": quality(service, pairs, [m.id for m in memories], sample),
        }
        service.close()
        queries = [pairs[i][1] for i in sample[: args.latency_queries]]
        texts = [a for a, _ in pairs]
        sizes = [10_000] + ([] if args.skip_100k else [100_000])
        result["latency"] = [latency(embedder, vectors, texts, queries, n, work, args.seed) for n in sizes]
        if args.layout:
            result["layout"] = layout(work, args.seed)
        if not args.skip_ttft:
            result["ttft"] = ttft(pairs, root, args.trials, work)
        embedder.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, result)
    report(result)
    print(f"\nresults: {args.out}")


def report(result: dict[str, Any]) -> None:
    """The tables."""
    q = result["quality"]
    print(f"\nretrieval quality: {q['queries']} queries among {q['memories']} memories (fortunes halves)")
    print(f"{'variant':<22} {'recall@5':>9} {'MRR@10':>8}")
    for row in q["rows"]:
        print(f"{row['variant']:<22} {row['recall@5']:>9.3f} {row['mrr@10']:>8.3f}")
    print("\nsearch latency, ms (p50 / p99); ratio = store p50 / exact numpy top-5 p50")
    print(f"{'memories':>9} {'index':<10} {'store':>15} {'store+embed':>15} {'numpy exact':>15} {'ratio':>6}")
    for row in result["latency"]:
        ref = row["numpy_exact"]
        for label in ("unindexed", "indexed"):
            cell = row.get(label)
            if not cell:
                continue
            s, e = cell["store"], cell["store+embedding"]
            print(
                f"{row['memories']:>9} {label:<10} {s['p50_ms']:>7.2f} / {s['p99_ms']:<6.2f} {e['p50_ms']:>7.2f} / "
                f"{e['p99_ms']:<6.2f} {ref['p50_ms']:>7.2f} / {ref['p99_ms']:<6.2f} {s['p50_ms'] / ref['p50_ms']:>6.2f}"
            )
        print(f"{'':>9} index built in {row['index_build_s']} s (child process); upserts {row['upsert_s']} s")
    if "layout" in result:
        lay = result["layout"]
        print(f"\nlayout: {lay['namespaces']} namespaces x {lay['per_namespace']} memories, dense top-5, indexed")
        for key in ("shard_per_namespace", "one_shard_with_filter"):
            row = lay[key]
            print(f"{key:<24} p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  index {row['index_build_s']} s")
    i = result["ingest"]
    print(
        f"\ningest: {i['memories_per_s']} memories/s (embedding + store) vs {i['embedding_alone_per_s']}/s embedding "
        f"alone: {i['ratio_to_embedding_alone']}"
    )
    if "ttft" in result:
        t = result["ttft"]
        print(f"\nchat TTFT, median of {t['trials']} (ms): " + ", ".join(f"{k} {v}" for k, v in t["median_ms"].items()))
        print(
            f"overhead vs no memory {t['overhead_vs_no_memory']:+.1%} (longer prompt + recall); recall alone "
            f"{t['recall_ms']} ms = {t['overhead_of_recall']:+.1%} of the TTFT without memory; injected words (median) "
            f"{t['injected_words_median']:.0f}"
        )


if __name__ == "__main__":
    main()
