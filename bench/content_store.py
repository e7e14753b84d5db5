"""Content store speed: the embedded store against a real js-ipfs daemon (raw ipfshttpclient calls), in one run.

Files of random bytes (default 100 MB), both profiles; every add gets a file with new content (so no store
already holds its blocks). Rows: local CID computation only; embedded add (blocks written, one syncfs at the end)
and the same with an fsync per block (the store before issue 19, as its reference); cat/fetch (every block
verified); js-ipfs add and cat through ipfshttpclient as they are;
the daemon backend's add and fetch (the same calls plus the local CID check). The daemon is started and stopped
by tests/ipfs_daemon.py (install it with scripts/ipfs/install.sh). Prints a table and writes
bench/results/content_store.json.

    .venv/bin/python bench/content_store.py [--mb 100] [--reps 2]
"""

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marketplace.blockstore import BlockStore
from marketplace.cid import Cid
from marketplace.content_store import EmbeddedStore, IpfsDaemonStore
from marketplace.unixfs import CHUNK_SIZE, PROFILES, Profile, compute_cid
from tests import ipfs_daemon

warnings.filterwarnings("ignore", category=FutureWarning)  # urllib3 about ipfshttpclient's arguments


class EveryBlockSynced(BlockStore):
    """The block store as it was before issue 19, this benchmark's reference: an fsync for every block written."""

    def put_verified(self, cid: Cid, data: bytes | memoryview, durable: bool = True) -> bool:
        """Store and fsync the block at once, whatever the caller asked."""
        return super().put_verified(cid, data, durable=True)


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of `reps` calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_random(path: Path, size: int, seed: int) -> Path:
    """`size` pseudo-random bytes from `seed`, written in 1 MiB pieces."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for left in range(size, 0, -(1 << 20)):
            f.write(rng.randbytes(min(left, 1 << 20)))
    return path


def timed_adds(add: Callable[[Path], Any], size: int, tmp: Path, reps: int) -> float:
    """Median seconds of `reps` adds, each of a file with new content (no block is already stored anywhere)."""
    times = []
    for _ in range(reps):
        path = write_random(tmp / "fresh.bin", size, seed=time.monotonic_ns())
        t0 = time.perf_counter()
        add(path)
        times.append(time.perf_counter() - t0)
        path.unlink()
    return statistics.median(times)


def bench_profile(profile: Profile, src: Path, tmp: Path, store: IpfsDaemonStore, reps: int) -> dict[str, float]:
    """Seconds per operation for one profile."""
    client = store._client
    options = {"cid_version": 1 if profile == "v1-raw" else 0, "raw_leaves": profile == "v1-raw"}

    def cid_only() -> None:
        with open(src, "rb") as f:
            compute_cid(f, profile)

    size = src.stat().st_size
    adds = EmbeddedStore(tmp / f"blocks-adds-{profile}")

    def js_add(path: Path) -> None:
        with open(path, "rb") as f:
            client.add(f, chunker=f"size-{CHUNK_SIZE}", **options)

    def js_cat() -> None:
        for _ in client.cat(cid, stream=True):
            pass

    every_block = EmbeddedStore(tmp / f"blocks-synced-{profile}")
    every_block.blocks = EveryBlockSynced(every_block.blocks.root)
    results = {
        "cid only": timed(cid_only, reps),
        "embedded add": timed_adds(lambda p: adds.add(p, profile), size, tmp, reps),
        "embedded add, fsync per block (before issue 19)": timed_adds(
            lambda p: every_block.add(p, profile), size, tmp, reps
        ),
    }
    embedded = EmbeddedStore(tmp / f"blocks-{profile}")
    cid = embedded.add(src, profile).cid
    results["embedded cat"] = timed(lambda: sum(len(b) for b in embedded.cat(cid)), reps)
    results["embedded fetch"] = timed(lambda: embedded.fetch(cid, tmp / "out-e.bin"), reps)
    results["js-ipfs add (raw client)"] = timed_adds(js_add, size, tmp, reps)
    store.add(src, profile)  # the daemon holds the file for the cat rows
    results["js-ipfs cat (raw client)"] = timed(js_cat, reps)
    results["daemon backend add"] = timed_adds(lambda p: store.add(p, profile), size, tmp, reps)
    results["daemon backend fetch"] = timed(lambda: store.fetch(cid, tmp / "out-d.bin"), reps)
    return results


def main() -> None:
    """Run the benchmark and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "content_store.json")
    args = ap.parse_args()
    reason = ipfs_daemon.missing_reason()
    if reason:
        sys.exit(reason)

    with tempfile.TemporaryDirectory(prefix="bench-content-") as tmp_name:
        tmp = Path(tmp_name)
        size = args.mb * 1_000_000
        src = write_random(tmp / "src.bin", size, seed=1)

        daemon = ipfs_daemon.start(tmp / "ipfs")
        rows: list[dict[str, Any]] = []
        try:
            store = IpfsDaemonStore(daemon.api_multiaddr, timeout=600)
            for profile in PROFILES:
                results = bench_profile(profile, src, tmp, store, args.reps)
                for what, seconds in results.items():
                    rows.append({"profile": profile, "what": what, "seconds": seconds, "MB_s": size / seconds / 1e6})
            store.close()
        finally:
            ipfs_daemon.stop(daemon)

    print(f"{'profile':8} {'what':28} {'s':>7} {'MB/s':>8}")
    for r in rows:
        print(f"{r['profile']:8} {r['what']:28} {r['seconds']:7.2f} {r['MB_s']:8.0f}")
    result = {
        "file_mb": args.mb,
        "reps": args.reps,
        "daemon": "js-ipfs 0.18.1 (npm ipfs@0.66.1)",
        "daemon_start_s": daemon.start_s,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"daemon start {daemon.start_s:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
