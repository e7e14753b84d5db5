"""Marketplace publish and pull against a real js-ipfs daemon's raw add/cat and a plain file copy, in one run.

Each repetition writes new files of random bytes (default 100 MB, a valid safetensors file holding one U8 tensor;
seeds fixed per repetition and role) so that no store already holds their blocks, runs every row once, in a fixed
order, then removes what it wrote: repetitions are interleaved, and every ratio pairs a row with its reference
from the same repetition (the table gives the median of those per-repetition ratios; speed ratios, > 1 = faster
than the reference). `os.sync()` runs before each timed step so that no step pays for another's dirty pages.

References: `shutil.copyfile` + fsync of the file; the daemon's own `add` (cid_version=1, raw_leaves=True,
chunker size-262144) and `cat` through `ipfshttpclient.Client` (upload chunk size 262144, as the daemon backend
uses), `cat` streamed and discarded, and streamed into a file + fsync; plain hashlib.sha256 of the file.

Mirador: publish by node A (`Marketplace.publish` of the file: sha256 for the manifest, add to the store, sign,
add the envelope, copy into A's artifacts folder with fsync) and pull of its envelope CID by node B (a fresh
registry, that trusts A, and a fresh artifacts folder every repetition: fetch of envelope and file with every block
verified, sha256 check of the file, fsync, rename), once through the embedded store (A and B share one blocks
folder) and once through the daemon backend (A and B are two clients of the same daemon). The store operations
alone (`EmbeddedStore` / `IpfsDaemonStore` add and fetch) and the v1-raw CID computation (vs sha256, both reading
the just-written file from a warm page cache) show where the time goes.

The daemon is started and stopped by tests/ipfs_daemon.py (install it with scripts/ipfs/install.sh). Prints a
table and writes bench/results/marketplace.json.

    .venv/bin/python bench/marketplace.py [--size-mb 100] [--reps 3]
"""

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipfshttpclient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crypto.identity import Identity
from marketplace.artifacts import Marketplace
from marketplace.content_store import ContentStore, EmbeddedStore, IpfsDaemonStore
from marketplace.registry import Registry
from marketplace.unixfs import CHUNK_SIZE, compute_cid
from tests import ipfs_daemon

warnings.filterwarnings("ignore", category=FutureWarning)  # urllib3 about ipfshttpclient's arguments

FILE_NAME = "weights.safetensors"
RAW_ADD_OPTIONS: dict[str, Any] = {"cid_version": 1, "raw_leaves": True, "chunker": f"size-{CHUNK_SIZE}"}

# (row, reference rows its ratios are taken against); references have none.
ROWS: list[tuple[str, list[str]]] = [
    ("file copy (copyfile + fsync)", []),
    ("daemon raw add (ipfshttpclient)", []),
    ("daemon raw cat (streamed, discarded)", []),
    ("daemon raw cat -> file + fsync", ["daemon raw cat (streamed, discarded)"]),
    ("sha256 (hashlib)", []),
    ("CID v1-raw (compute_cid)", ["sha256 (hashlib)"]),
    ("publish, embedded store", ["daemon raw add (ipfshttpclient)", "file copy (copyfile + fsync)"]),
    ("pull, embedded store", ["daemon raw cat (streamed, discarded)", "file copy (copyfile + fsync)"]),
    ("publish, daemon backend", ["daemon raw add (ipfshttpclient)", "file copy (copyfile + fsync)"]),
    ("pull, daemon backend", ["daemon raw cat (streamed, discarded)", "file copy (copyfile + fsync)"]),
    ("EmbeddedStore.add (store only)", ["file copy (copyfile + fsync)"]),
    ("EmbeddedStore.fetch (store only)", ["file copy (copyfile + fsync)"]),
    ("IpfsDaemonStore.add (store only)", ["daemon raw add (ipfshttpclient)"]),
    ("IpfsDaemonStore.fetch (store only)", ["daemon raw cat (streamed, discarded)"]),
]


def write_safetensors(path: Path, size: int, seed: int) -> Path:
    """A `size`-byte safetensors file: one U8 tensor of pseudo-random bytes from `seed`, written in 1 MiB pieces."""
    header = b""
    n = 0
    for _ in range(3):  # the header's length depends on n's digits; settles at once for sizes of this order
        n = size - 8 - len(header)
        header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
        header += b" " * (-len(header) % 8)
    assert 8 + len(header) + n == size
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for left in range(n, 0, -(1 << 20)):
            f.write(rng.randbytes(min(left, 1 << 20)))
    return path


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, after flushing every dirty page so it pays only for its own writes."""
    os.sync()
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def fsync_path(path: Path) -> None:
    """fsync one file."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def copy_with_fsync(src: Path, dst: Path) -> None:
    """The plain-copy reference: `shutil.copyfile` and fsync of the copy."""
    shutil.copyfile(src, dst)
    fsync_path(dst)


def sha256_file(path: Path) -> str:
    """Plain sha256 of a file in 1 MiB reads."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cid_file(path: Path) -> str:
    """The v1-raw CID of a file (nothing stored)."""
    with open(path, "rb") as f:
        return str(compute_cid(f, "v1-raw").root)


def node(root: Path, store: ContentStore, identity: Identity | None) -> Marketplace:
    """A Marketplace with its own registry and artifacts folder under `root`."""
    root.mkdir(parents=True)
    return Marketplace(root / "artifacts", store, Registry(root / "registry.db"), identity)


def publish(market: Marketplace, path: Path, name: str) -> str:
    """Publish `path` as `name@1.0.0`; returns the envelope CID."""
    return market.publish(path, name=name, version="1.0.0", kind="model", license="apache-2.0").envelope_cid


def pull(market: Marketplace, envelope_cid: str, size: int) -> None:
    """Pull an envelope CID and check that the file arrived (the pull itself verified everything)."""
    installed = market.pull(envelope_cid)
    if not installed.publisher_trusted or (installed.folder / FILE_NAME).stat().st_size != size:
        raise RuntimeError(f"pull of {envelope_cid} did not install a trusted, complete {FILE_NAME}")


def one_rep(rep: int, seed: int, size: int, tmp: Path, api: str, identity: Identity) -> dict[str, float]:
    """Seconds of every row for one repetition (new files, stores and nodes; all removed afterwards)."""
    work = tmp / f"rep-{rep}"
    work.mkdir()
    files = {}
    for i, role in enumerate(["ref", "raw", "emb-store", "daemon-store", "emb-pub", "daemon-pub"]):
        (work / role).mkdir()
        files[role] = write_safetensors(work / role / FILE_NAME, size, seed * 1000 + rep * 10 + i)

    client: Any = ipfshttpclient.Client(api, timeout=600, chunk_size=CHUNK_SIZE)
    daemon_a = IpfsDaemonStore(api, timeout=600)
    daemon_b = IpfsDaemonStore(api, timeout=600)
    blocks = EmbeddedStore(work / "blocks")  # shared by the embedded A and B
    store_only = EmbeddedStore(work / "blocks-store-only")
    a_emb = node(work / "a-emb", blocks, identity)
    a_daemon = node(work / "a-daemon", daemon_a, identity)
    b_emb = node(work / "b-emb", blocks, None)
    b_daemon = node(work / "b-daemon", daemon_b, None)
    for b in (b_emb, b_daemon):
        b.registry.trust(identity.fingerprint, identity.public_key_b64(), "A")

    def raw_add() -> str:
        with open(files["raw"], "rb") as f:
            return str(client.add(f, **RAW_ADD_OPTIONS)["Hash"])

    def raw_cat(cid: str) -> int:
        return sum(len(piece) for piece in client.cat(cid, stream=True))

    def raw_cat_to_file(cid: str, dest: Path) -> None:
        with open(dest, "wb") as f:
            for piece in client.cat(cid, stream=True):
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())

    s: dict[str, float] = {}
    ref = files["ref"]
    s["file copy (copyfile + fsync)"], _ = timed(lambda: copy_with_fsync(ref, work / "copy.bin"))
    s["sha256 (hashlib)"], digest = timed(lambda: sha256_file(ref))
    s["CID v1-raw (compute_cid)"], cid = timed(lambda: cid_file(ref))
    s["daemon raw add (ipfshttpclient)"], raw_cid = timed(raw_add)
    s["daemon raw cat (streamed, discarded)"], n = timed(lambda: raw_cat(raw_cid))
    s["daemon raw cat -> file + fsync"], _ = timed(lambda: raw_cat_to_file(raw_cid, work / "cat.bin"))
    if n != size or sha256_file(work / "cat.bin") != sha256_file(files["raw"]) or len(digest) != 64 or not cid:
        raise RuntimeError("a reference row did not produce what it should")

    s["EmbeddedStore.add (store only)"], added = timed(lambda: store_only.add(files["emb-store"]))
    s["EmbeddedStore.fetch (store only)"], _ = timed(lambda: store_only.fetch(added.cid, work / "fetch-e.bin"))
    s["IpfsDaemonStore.add (store only)"], added_d = timed(lambda: daemon_a.add(files["daemon-store"]))
    s["IpfsDaemonStore.fetch (store only)"], _ = timed(lambda: daemon_a.fetch(added_d.cid, work / "fetch-d.bin"))

    s["publish, embedded store"], env_e = timed(lambda: publish(a_emb, files["emb-pub"], "bench-emb"))
    s["pull, embedded store"], _ = timed(lambda: pull(b_emb, env_e, size))
    s["publish, daemon backend"], env_d = timed(lambda: publish(a_daemon, files["daemon-pub"], "bench-daemon"))
    s["pull, daemon backend"], _ = timed(lambda: pull(b_daemon, env_d, size))

    for market in (a_emb, a_daemon, b_emb, b_daemon):
        market.registry.close()
    for closable in (client, daemon_a, daemon_b):
        closable.close()
    shutil.rmtree(work)
    return s


def main() -> None:
    """Run the benchmark and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "marketplace.json")
    args = ap.parse_args()
    reason = ipfs_daemon.missing_reason()
    if reason:
        sys.exit(reason)
    size = args.size_mb * 1_000_000
    identity = Identity.generate()
    reps: list[dict[str, float]] = []
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="bench-marketplace-") as tmp_name:
        tmp = Path(tmp_name)
        daemon = ipfs_daemon.start(tmp / "ipfs")
        try:
            version = str(IpfsDaemonStore(daemon.api_multiaddr).version())
            for rep in range(args.reps):
                reps.append(one_rep(rep, args.seed, size, tmp, daemon.api_multiaddr, identity))
                print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
        finally:
            ipfs_daemon.stop(daemon)

    rows: list[dict[str, Any]] = []
    for what, refs in ROWS:
        seconds = [r[what] for r in reps]
        ratios = {ref: [r[ref] / r[what] for r in reps] for ref in refs}
        rows.append(
            {
                "what": what,
                "seconds": statistics.median(seconds),
                "MB_s": size / statistics.median(seconds) / 1e6,
                "seconds_per_rep": seconds,
                "speed_ratio_vs": {ref: statistics.median(v) for ref, v in ratios.items()},
                "speed_ratio_per_rep": ratios,
            }
        )

    print(f"{'what':40} {'s':>6} {'MB/s':>7}  speed ratio (median of per-rep ratios)")
    for r in rows:
        ratio_text = ", ".join(f"{v:.3f} vs {k}" for k, v in r["speed_ratio_vs"].items())
        print(f"{r['what']:40} {r['seconds']:6.3f} {r['MB_s']:7.0f}  {ratio_text}")
    result = {
        "file_mb": args.size_mb,
        "reps": args.reps,
        "seed": args.seed,
        "daemon": f"js-ipfs {version} (npm ipfs@0.66.1)",
        "daemon_start_s": daemon.start_s,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"daemon {version}, start {daemon.start_s:.1f} s; load {load_before[0]:.2f} before; wrote {args.out}")


if __name__ == "__main__":
    main()
