"""P2P speed: DHT put/get latency, block transfer against raw libp2p streams, and pulls from 1 to 4 providers.

Three sections, each one skippable:

dht: N registry nodes (`registry_node`, DHT on, gossipsub off: the registry does not use it) run in one trio loop on
127.0.0.1, each dialling one random earlier node, and refresh their routing tables (one node at a time, in turn)
until every node knows every other one or --converge-s passes. Then for each of K records, a publisher (the nodes
in turn, in random order: py-libp2p refuses more than 10 ADD_PROVIDER per peer per 10 s) times
`DhtRegistry.announce` (signed record put + provider announce of the name) and a bare `dht.put_value` of another
signed record (`sign_record` / `record_key`); another random node times `lookup` of the name (a providers walk and
a record walk per publisher, side by side) and `lookup_before` (the lookup before issue 19, kept here as the
reference of the same run), `dht.get_value` of the bare record (py-libp2p answers from the local store when the node
is one of the k=20 closest, so the local hits are counted) and `DhtRegistry.values` of it (a GET_VALUE walk that
always asks the network). All hosts share one Python thread, so these latencies are upper bounds for a network of
separate processes. Routing-table sizes after convergence and after the operations are reported: py-libp2p resets
inbound DHT streams beyond 12 at a time and the opener then drops that peer from its table.

transfer: two bare hosts (no DHT, no pubsub) in one trio loop, so both ends share one Python thread. Reference: a
raw libp2p stream (Noise + Yamux) whose handler reads and discards, the sender writing the payload in 256 KiB
writes and waiting for a 1-byte reply; then the same bytes as 256 KiB `framing.send_frame` frames (sha256 and
stop-and-wait ACK per frame); then `fetch_dag` of a v1-raw file of the same size from one `BlockServer` into an
empty BlockStore over the libp2p block protocol (every block verified, one sync at the end), the same fetch over the
bulk channel (`node.market.bulk`: sealed records on a direct TCP connection, wants pipelined, no ACKs), a raw TCP
socket on 127.0.0.1 (256 KiB `sendall`s in a thread, the receiver discarding: what the wire gives Python at all),
and `EmbeddedStore.add` of the file as the local disk reference. Repetitions are interleaved; medians, and the
median of per-repetition ratios against the raw libp2p stream. The raw stream and both fetches are then repeated with
the provider in a separate process (`bench/p2p.py --serve-provider`, its own interpreter and core): the goal's
"between two processes".

pull: five real daemons A-E (`mirador node start`, separate processes, MIRADOR_P2P_PORT=0, homes in a temp folder,
each bootstrapping from the previous one), once with the bulk channel off (`MIRADOR_P2P_BULK=false`: the libp2p
block protocol, the reference) and once with it on (the default), each with its own repetitions; with --uplink-mbs
a third time, the bulk channel on and every daemon's upload capped (`MIRADOR_P2P_UPLOAD_LIMIT_MBS`), as a home
uplink would. Each repetition, A publishes a new safetensors model version (`mirador model publish --no-bench`,
new random content); then B, C, D and E pull it in turn through
`POST /v1/market/pull` (NDJSON read until `done`). Every puller provides the model once it has it, so B pulls from
1 provider (A), C from 2, D from 3 (A, B, C) and E from 4; ratios are against B's pull of the same repetition. The
`providers` of each done event (blocks per provider) shows where the blocks came from; the "fetch window" runs from
the file's first progress event to its last (the rest of a pull is DHT lookup, export + fsync, sha256, provide);
CPU is each daemon's user + system time over the pull (/proc), as a share of one core. `EmbeddedStore.add` of the
same file is the local disk reference. Every daemon is stopped at the end, whatever happens.

Sizes are in MiB (2**20 bytes); speeds in MB/s (10**6 bytes/s). Prints a table and writes bench/results/p2p.json.

    .venv/bin/python bench/p2p.py [--quick] [--no-dht] [--no-transfer] [--no-pull] [--nodes 8,32] [--records 20]
                                  [--transfer-mib 64] [--reps 3] [--model-mib 100] [--pull-reps 3]
"""

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LogCounter, load, run_header
from crypto.identity import Identity
from marketplace.blockstore import BlockStore
from marketplace.cid import Cid
from marketplace.content_store import EmbeddedStore
from marketplace.registry_record import ValidRecord, record_key, select_record, sign_record, validate_record
from node.market.block_exchange import PROTOCOL, BlockServer, fetch_dag
from node.market.bulk import BulkServer, open_channel
from node.market.registry_dht import DhtRegistry, fingerprint_of_peer, name_key, registry_node
from node.p2p.framing import ByteStream, FrameError, FrameTruncated, receive_frame, send_frame
from node.p2p.host import Libp2pStream, P2PConfig, P2PNode
from tests.daemon_harness import Daemon, node_env, start_daemon

ENVELOPE_CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"  # any CID: records are not resolved
DHT_CONFIG = P2PConfig(pubsub=False, dial_timeout=5, negotiate_timeout=5)
BARE_CONFIG = P2PConfig(dht=False, pubsub=False, dial_timeout=5, negotiate_timeout=5)
SINK_PROTOCOL = "/mirador/bench/sink/1.0.0"
FRAMES_PROTOCOL = "/mirador/bench/frames/1.0.0"
FRAME_TYPE = "bench.data"
WRITE_SIZE = 256 * 1024
IO_TIMEOUT_S = 30.0
MIB = 1 << 20
MODEL_FILE = "model.safetensors"
DISCOVERY_TIMEOUT_S = 60.0
PULL_TIMEOUT_S = 600.0

Row = dict[str, Any]


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method; the value itself for a single sample)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# --- dht ----------------------------------------------------------------------------------------------------------


async def converge(nodes: list[P2PNode], limit_s: float) -> tuple[float, int]:
    """Refresh routing tables, one node at a time in turn, until each node knows all others or `limit_s` passes.

    One at a time converges faster than all at once here: concurrent walks in one thread time out. Returns
    (seconds taken, the smallest routing table).
    """
    t0 = time.perf_counter()
    while True:
        for node in nodes:
            smallest = min(len(other.known_peers()) for other in nodes)
            if smallest >= len(nodes) - 1 or time.perf_counter() - t0 > limit_s:
                return time.perf_counter() - t0, smallest
            await node.discover()


async def closest_peers_before(dht: KadDHT, key: bytes) -> list[ID]:
    """py-libp2p's FIND_NODE walk (bounded), without the DHT's own peer: how lookups found peers before issue 19."""
    with trio.move_on_after(10):
        peers = await dht.peer_routing.find_closest_peers_network(key)
        return [p for p in peers if p != dht.local_peer_id]
    return []


async def values_before(dht: KadDHT, key: str) -> list[bytes]:
    """Every valid record for `key` from the local store and the closest peers, one GET_VALUE stream each, 3 at a
    time: `DhtRegistry.values` before issue 19."""
    local = dht.value_store.get(key.encode())
    found = [local.value] if local is not None else []
    limiter = trio.CapacityLimiter(3)

    async def ask(peer: ID) -> None:
        async with limiter:
            with trio.move_on_after(5), contextlib.suppress(Exception):
                value = await dht.value_store._get_from_peer(peer, key.encode())
                if isinstance(value, bytes) and value not in found:
                    validate_record(key, value)
                    found.append(value)

    async with trio.open_nursery() as nursery:
        for peer in await closest_peers_before(dht, key.encode()):
            nursery.start_soon(ask, peer)
    return found


async def lookup_before(registry: DhtRegistry, name: str) -> list[ValidRecord]:
    """The registry lookup as it was before issue 19, kept as this benchmark's reference: a FIND_NODE walk for the
    name key's closest peers, GET_PROVIDERS to each (3 at a time, a new stream per request), then for every
    publisher (ours always included), one after the other, another FIND_NODE walk and GET_VALUE to each."""
    dht = registry.dht
    key = name_key(name)
    found = {p.peer_id for p in dht.provider_store.get_providers(key)}
    limiter = trio.CapacityLimiter(3)

    async def ask(peer: ID) -> None:
        async with limiter:
            with trio.move_on_after(5):
                with contextlib.suppress(Exception):
                    answer, _ = await dht.provider_store._get_providers_from_peer_with_closers(peer, key)
                    found.update(info.peer_id for info in answer)

    async with trio.open_nursery() as nursery:
        for peer in await closest_peers_before(dht, key):
            nursery.start_soon(ask, peer)
    publishers = {registry.identity.fingerprint} | {f for f in map(fingerprint_of_peer, found) if f is not None}
    records = []
    for publisher in sorted(publishers):
        rkey = record_key(name, publisher)
        values = await values_before(dht, rkey)
        best = select_record(rkey, values)
        if best >= 0:
            records.append(validate_record(rkey, values[best]))
    return records


async def timed_async(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    """(milliseconds, result) of one awaited call."""
    t0 = time.perf_counter()
    result = await fn()
    return (time.perf_counter() - t0) * 1000, result


async def dht_ops(nodes: list[tuple[P2PNode, DhtRegistry]], records: int, rng: random.Random) -> dict[str, Any]:
    """Time announce / put_value on publishers and lookup / get_value / values on other random nodes."""
    ms: dict[str, list[float]] = {
        "announce": [],
        "put_value": [],
        "lookup": [],
        "lookup_before": [],
        "get_value": [],
        "values": [],
    }
    found = {"lookup": 0, "lookup_before": 0, "get_value": 0, "values": 0}
    same = 0
    local_hits = 0
    remote_get_ms: list[float] = []
    order = rng.sample(range(len(nodes)), len(nodes))
    for i in range(records):
        (pub_node, publisher) = nodes[order[i % len(nodes)]]
        (get_node, getter) = rng.choice([pair for pair in nodes if pair[0] is not pub_node])
        assert pub_node.dht is not None and get_node.dht is not None
        pub_dht, get_dht = pub_node.dht, get_node.dht
        name, bare_name = f"bench-{len(nodes)}-{i}", f"bench-bare-{len(nodes)}-{i}"
        fingerprint = publisher.identity.fingerprint
        t, _ = await timed_async(partial(publisher.announce, name, {"1.0.0": ENVELOPE_CID}))
        ms["announce"].append(t)
        key = record_key(bare_name, fingerprint)
        value = sign_record(publisher.identity, bare_name, {"1.0.0": ENVELOPE_CID}, seq=1)
        t, _ = await timed_async(partial(pub_dht.put_value, key, value))
        ms["put_value"].append(t)

        t, got = await timed_async(partial(getter.lookup, name))
        ms["lookup"].append(t)
        found["lookup"] += any(r.record.publisher == fingerprint for r in got)
        t, before = await timed_async(partial(lookup_before, getter, name))
        ms["lookup_before"].append(t)
        found["lookup_before"] += any(r.record.publisher == fingerprint for r in before)
        same += [r.raw for r in got] == [r.raw for r in before]
        local = get_dht.value_store.get(key.encode()) is not None
        local_hits += local
        t, got_value = await timed_async(partial(get_dht.get_value, key))
        ms["get_value"].append(t)
        if not local:
            remote_get_ms.append(t)
        found["get_value"] += got_value == value
        t, values = await timed_async(partial(getter.values, key))
        ms["values"].append(t)
        found["values"] += value in values
    return {
        "ms": ms,
        "found": found,
        "same_records": same,
        "get_value_local_hits": local_hits,
        "get_value_remote_ms": remote_get_ms,
    }


async def dht_network(n: int, records: int, rng: random.Random, converge_limit_s: float) -> dict[str, Any]:
    """Start `n` registry nodes, let them converge, time the operations, stop them."""
    nodes: list[tuple[P2PNode, DhtRegistry]] = []
    async with trio.open_nursery() as nursery:
        try:
            t0 = time.perf_counter()
            for _ in range(n):
                node, registry = registry_node(Identity.generate(), DHT_CONFIG)
                await nursery.start(node.run)
                if nodes:
                    await node.connect(rng.choice(nodes)[0].listen_addrs[0])
                nodes.append((node, registry))
            start_s = time.perf_counter() - t0
            converge_s, smallest = await converge([node for node, _ in nodes], converge_limit_s)
            converged_tables = sorted(len(node.known_peers()) for node, _ in nodes)
            result = await dht_ops(nodes, records, rng)
            result |= {
                "nodes": n,
                "records": records,
                "start_s": start_s,
                "converge_s": converge_s,
                "smallest_routing_table": smallest,
                "routing_tables_after_converge": converged_tables,
                "routing_tables_after_ops": sorted(len(node.known_peers()) for node, _ in nodes),
            }
        finally:
            for node, _ in nodes:
                node.stop()
            nursery.cancel_scope.deadline = trio.current_time() + 15  # closing many hosts must not hang the run
    return result


def dht_rows(result: dict[str, Any]) -> list[Row]:
    """Table rows of one network size."""
    n, k = result["nodes"], result["records"]
    remote = result["get_value_remote_ms"]
    get_notes = f"found {result['found']['get_value']}/{k}; {result['get_value_local_hits']}/{k} local hits"
    if remote:
        get_notes += f"; the others: median {statistics.median(remote):.0f} ms"
    speedup = statistics.median(result["ms"]["lookup"]) / statistics.median(result["ms"]["lookup_before"])
    notes = {
        "announce": "signed put_value + provide(name key)",
        "put_value": "bare signed record",
        "lookup": f"one session: providers walk, record walks side by side; found {result['found']['lookup']}/{k}, "
        f"same records as the reference {result['same_records']}/{k}; "
        f"{speedup:.2f}x its median",
        "lookup_before": f"reference: the lookup before issue 19; found {result['found']['lookup_before']}/{k}",
        "get_value": get_notes,
        "values": f"a GET_VALUE walk (every distinct valid value); found {result['found']['values']}/{k}",
    }
    what = {
        "announce": "DhtRegistry.announce",
        "put_value": "dht.put_value",
        "lookup": "DhtRegistry.lookup",
        "lookup_before": "lookup, pre-issue-19 reference",
        "get_value": "dht.get_value",
        "values": "DhtRegistry.values",
    }
    before, after = result["routing_tables_after_converge"], result["routing_tables_after_ops"]
    tables = {
        "section": f"dht N={n}",
        "what": "start + converge (bounded)",
        "value": result["start_s"] + result["converge_s"],
        "p90": None,
        "unit": "s",
        "notes": f"start {result['start_s']:.1f} s; routing tables of {n - 1} peers: min/median {before[0]}/"
        f"{statistics.median(before):.0f} after converge, {after[0]}/{statistics.median(after):.0f} after the ops",
    }
    return [tables] + [
        {
            "section": f"dht N={n}",
            "what": what[op],
            "value": statistics.median(v),
            "p90": pct(v, 90),
            "unit": "ms",
            "notes": notes[op],
        }
        for op, v in result["ms"].items()
    ]


# --- transfer -----------------------------------------------------------------------------------------------------


async def read_exactly(stream: Libp2pStream, n: int) -> bytes:
    """Exactly `n` bytes, or fewer if the stream ends."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


async def sink_handler(stream: Libp2pStream) -> None:
    """Read an 8-byte length, then that many bytes (discarded); reply b"k"."""
    left = int.from_bytes(await read_exactly(stream, 8), "big")
    while left > 0:
        chunk = await stream.read(min(left, MIB))
        if not chunk:
            return
        left -= len(chunk)
    await stream.write(b"k")


async def frames_handler(stream: Libp2pStream) -> None:
    """Receive (verify, ACK, discard) frames until the sender closes the stream."""
    while True:
        try:
            await receive_frame(stream, {FRAME_TYPE: WRITE_SIZE}, read_timeout=IO_TIMEOUT_S)
        except FrameTruncated:
            return  # the end of the stream (or a sender that died: it sees its own error)
        except FrameError as exc:
            logging.getLogger(__name__).warning("frames handler: %s", exc)
            return


async def raw_push(client: P2PNode, peer: ID, size: int, payload: bytes) -> float:
    """Seconds to open a sink stream, write `size` bytes in WRITE_SIZE writes and get the 1-byte reply."""
    t0 = time.perf_counter()
    stream = await client.open_stream(peer, SINK_PROTOCOL)
    await stream.write(size.to_bytes(8, "big"))
    for start in range(0, size, WRITE_SIZE):
        await stream.write(payload[: min(WRITE_SIZE, size - start)])
    with trio.fail_after(IO_TIMEOUT_S):
        reply = await stream.read(1)
    elapsed = time.perf_counter() - t0
    await stream.close()
    if reply != b"k":
        raise RuntimeError(f"the sink answered {reply!r}")
    return elapsed


async def framed_push(client: P2PNode, peer: ID, size: int, payload: bytes) -> float:
    """Seconds to send `size` bytes as WRITE_SIZE frames, each acknowledged."""
    t0 = time.perf_counter()
    stream = await client.open_stream(peer, FRAMES_PROTOCOL)
    for start in range(0, size, WRITE_SIZE):
        frame = payload[: min(WRITE_SIZE, size - start)]
        await send_frame(stream, FRAME_TYPE, frame, write_timeout=IO_TIMEOUT_S, ack_timeout=IO_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    await stream.close()
    return elapsed


async def fetch_once(client: P2PNode, provider: ID, root: Cid, dest: Path, size: int, bulk: bool = False) -> float:
    """Seconds of `fetch_dag` of `root` from `provider` into an empty BlockStore at `dest` (over the bulk channel
    with `bulk`, else the libp2p block protocol)."""

    async def open_stream(peer: ID) -> ByteStream:
        return await client.open_stream(peer, PROTOCOL)

    async def open_bulk(peer: ID) -> Any:
        return await open_channel(client, peer)

    t0 = time.perf_counter()
    report = await fetch_dag(root, [provider], open_stream, BlockStore(dest), open_bulk=open_bulk if bulk else None)
    elapsed = time.perf_counter() - t0
    if report.total_bytes != size or report.failures:
        raise RuntimeError(f"fetch of {root} did not complete: {report}")
    if report.channels != {str(provider): "bulk" if bulk else "libp2p"}:
        raise RuntimeError(f"fetch of {root} went over {report.channels}")
    return elapsed


def tcp_push(size: int, payload: bytes) -> float:
    """Seconds to send `size` bytes over a fresh 127.0.0.1 TCP connection in WRITE_SIZE `sendall`s to a thread that
    reads and discards them, until it has them all."""
    server = socket.create_server(("127.0.0.1", 0))
    got = [0]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            buf = bytearray(MIB)
            while got[0] < size and (n := conn.recv_into(buf)):
                got[0] += n

    reader = threading.Thread(target=sink)
    reader.start()
    t0 = time.perf_counter()
    with socket.create_connection(server.getsockname()) as conn:
        for start in range(0, size, WRITE_SIZE):
            conn.sendall(payload[: min(WRITE_SIZE, size - start)])
        reader.join()
    elapsed = time.perf_counter() - t0
    server.close()
    if got[0] != size:
        raise RuntimeError(f"the TCP sink got {got[0]} of {size} bytes")
    return elapsed


def timed_add(src: Path, folder: Path) -> tuple[float, str]:
    """(seconds, root CID) of `EmbeddedStore.add` of `src` into a new store at `folder`, after os.sync()."""
    os.sync()
    t0 = time.perf_counter()
    cid = EmbeddedStore(folder).add(src).cid
    return time.perf_counter() - t0, cid


async def transfer_section(size: int, reps: int, tmp: Path, seed: int) -> dict[str, Any]:
    """Raw stream, framed and fetch_dag throughput between two in-process hosts, `reps` interleaved runs."""
    src = tmp / "transfer.bin"
    rng = random.Random(seed)
    with open(src, "wb") as f:
        for left in range(size, 0, -MIB):
            f.write(rng.randbytes(min(left, MIB)))
    payload = rng.randbytes(WRITE_SIZE)
    _, cid = timed_add(src, tmp / "provider-blocks")
    root = Cid.parse(cid)
    seconds: dict[str, list[float]] = {"raw": [], "framed": [], "fetch": [], "bulk": [], "tcp": [], "add": []}
    async with trio.open_nursery() as nursery:
        client = await nursery.start(P2PNode(Identity.generate(), BARE_CONFIG).run)
        provider = await nursery.start(P2PNode(Identity.generate(), BARE_CONFIG).run)
        try:
            provider.set_stream_handler(SINK_PROTOCOL, sink_handler)
            provider.set_stream_handler(FRAMES_PROTOCOL, frames_handler)
            BlockServer(EmbeddedStore(tmp / "provider-blocks").blocks).attach(provider)
            bulk = BulkServer(EmbeddedStore(tmp / "provider-blocks").blocks)
            bulk.attach(provider)
            peer = await client.connect(provider.listen_addrs[0])
            for rep in range(reps):
                seconds["raw"].append(await raw_push(client, peer, size, payload))
                seconds["framed"].append(await framed_push(client, peer, size, payload))
                os.sync()
                seconds["fetch"].append(await fetch_once(client, peer, root, tmp / f"fetched-{rep}", size))
                shutil.rmtree(tmp / f"fetched-{rep}")
                os.sync()
                seconds["bulk"].append(await fetch_once(client, peer, root, tmp / f"bulk-{rep}", size, bulk=True))
                shutil.rmtree(tmp / f"bulk-{rep}")
                seconds["tcp"].append(await trio.to_thread.run_sync(tcp_push, size, payload))
                add_s, _ = await trio.to_thread.run_sync(timed_add, src, tmp / f"added-{rep}")
                seconds["add"].append(add_s)
                shutil.rmtree(tmp / f"added-{rep}")
                print(f"transfer rep {rep + 1}/{reps} done", file=sys.stderr)
        finally:
            bulk.stop()
            client.stop()
            provider.stop()
    src.unlink()
    ratios = {k: [r / x for r, x in zip(seconds["raw"], seconds[k], strict=True)] for k in ("fetch", "bulk", "tcp")}
    return {
        "bytes": size,
        "reps": reps,
        "seconds": seconds,
        "fetch_over_raw_speed": ratios["fetch"],
        "bulk_over_raw_speed": ratios["bulk"],
        "tcp_over_raw_speed": ratios["tcp"],
        "bulk_over_fetch_speed": [f / b for f, b in zip(seconds["fetch"], seconds["bulk"], strict=True)],
    }


def transfer_rows(result: dict[str, Any]) -> list[Row]:
    """Table rows of the transfer section."""
    size = result["bytes"]
    what = {
        "raw": "raw libp2p stream (256 KiB writes)",
        "framed": "framed (send_frame 256 KiB + ACK)",
        "fetch": "fetch_dag v1-raw, libp2p protocol",
        "bulk": "fetch_dag v1-raw, bulk channel",
        "tcp": "raw TCP socket, 127.0.0.1 (wire ref)",
        "add": "EmbeddedStore.add (local disk ref)",
    }
    rows = []
    for key, label in what.items():
        secs = result["seconds"][key]
        speeds = [size / s / 1e6 for s in secs]
        notes = f"{statistics.median(secs):.2f} s; reps " + " ".join(f"{v:.1f}" for v in speeds)
        if key in ("fetch", "bulk", "tcp"):
            notes += f"; /raw libp2p {statistics.median(result[f'{key}_over_raw_speed']):.3f}"
        if key == "bulk":
            notes += f"; /libp2p protocol {statistics.median(result['bulk_over_fetch_speed']):.2f}"
        if key == "framed":
            framed_ratios = [r / f for r, f in zip(result["seconds"]["raw"], secs, strict=True)]
            notes += f"; framed/raw {statistics.median(framed_ratios):.3f}"
        rows.append(
            {
                "section": f"transfer {size // MIB} MiB",
                "what": label,
                "value": statistics.median(speeds),
                "p90": None,
                "unit": "MB/s",
                "notes": notes,
            }
        )
    return rows


# --- pull ---------------------------------------------------------------------------------------------------------


def write_safetensors(path: Path, size: int, seed: int) -> None:
    """A valid `size`-byte safetensors file: one U8 tensor of seeded random bytes, written in 1 MiB pieces."""
    header = b""
    n = 0
    for _ in range(3):  # the header's length depends on n's digits; settles at once
        n = size - 8 - len(header)
        header = json.dumps({"weights": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
        header += b" " * (-len(header) % 8)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for left in range(n, 0, -MIB):
            f.write(rng.randbytes(min(left, MIB)))


def peers_of(d: Daemon) -> dict[str, Any]:
    """The daemon's /v1/node/peers document."""
    doc: dict[str, Any] = httpx.get(f"{d.url}/v1/node/peers", timeout=10).json()
    return doc


def wait_until_all_known(daemons: list[Daemon], ids: list[str]) -> float:
    """Seconds until every routing table holds every other daemon (bounded by DISCOVERY_TIMEOUT_S)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < DISCOVERY_TIMEOUT_S:
        known = [set(peers_of(d)["known_peers"]) for d in daemons]
        if all(k >= set(ids) - {ids[i]} for i, k in enumerate(known)):
            break
        time.sleep(0.25)
    return time.perf_counter() - t0


def pull_once(d: Daemon, target: str, size: int) -> dict[str, Any]:
    """Pull `target` through the daemon's API; seconds to `done`, the transfer window, and the done event."""
    t0 = time.perf_counter()
    first = last = -1.0
    done: dict[str, Any] = {}
    body = {"target": target, "trust_publisher": True}
    with httpx.stream("POST", f"{d.url}/v1/market/pull", json=body, headers=d.auth, timeout=PULL_TIMEOUT_S) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line:
                continue
            event = json.loads(line)
            now = time.perf_counter() - t0
            if event["event"] == "progress" and event.get("file") == MODEL_FILE:
                first = now if first < 0 else first
                if event["done"] >= event["total"]:
                    last = now
            elif event["event"] in ("done", "error"):
                done = event
                break
    seconds = time.perf_counter() - t0
    if done.get("event") != "done":
        raise RuntimeError(f"pull on {d.url} failed: {done or 'no done event'}")
    return {"seconds": seconds, "MB_s": size / seconds / 1e6, "transfer_window_s": [first, last], "done": done}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far; NaN where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def stop_daemons(daemons: dict[str, Daemon]) -> None:
    """Stop every daemon still running (SIGTERM, then SIGKILL after 10 s)."""
    for d in daemons.values():
        if d.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # stop() has killed it then
                d.stop()


def publish(a: Daemon, folder: Path, version: str) -> float:
    """Seconds of `mirador model publish FOLDER --name big --version VERSION --no-bench` on daemon A's home."""
    cmd = [sys.executable, "-m", "node.cli", "model", "publish", str(folder), "--name", "big", "--version", version]
    os.sync()
    t0 = time.perf_counter()
    done = subprocess.run(
        [*cmd, "--no-bench"], env=node_env(a.home, a.port), capture_output=True, text=True, timeout=600
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or "announced big" not in done.stdout:
        raise RuntimeError(f"publish failed: {done.stdout}\n{done.stderr}")
    return seconds


def pull_rep(daemons: dict[str, Daemon], letter_of: dict[str, str], size: int, tmp: Path, rep: int, seed: int) -> Row:
    """One repetition: A publishes big@1.REP.0 (new content), then B, C, D, E pull it in turn."""
    version = f"1.{rep}.0"
    folder = tmp / f"big-{rep}"
    folder.mkdir()
    write_safetensors(folder / MODEL_FILE, size, seed * 1000 + rep)
    add_s, _ = timed_add(folder / MODEL_FILE, tmp / "reference-blocks")
    shutil.rmtree(tmp / "reference-blocks")
    out: Row = {"version": version, "embedded_add_s": add_s, "publish_s": publish(daemons["A"], folder, version)}
    out["pulls"] = []
    for n_providers, letter in enumerate("BCDE", start=1):
        os.sync()
        cpu_before = {name: cpu_seconds(d.pid) for name, d in daemons.items()}
        pulled = pull_once(daemons[letter], f"big@{version}", size)
        daemons[letter].wait_provided()  # the next puller finds this one among the providers
        pulled["cpu_s"] = {name: cpu_seconds(d.pid) - cpu_before[name] for name, d in daemons.items()}
        by_letter = {letter_of.get(p, p): blocks for p, blocks in pulled["done"]["providers"].items()}
        pulled |= {"puller": letter, "providers_expected": n_providers, "blocks_by_provider": by_letter}
        out["pulls"].append(pulled)
        print(f"rep {rep + 1}: {letter} pulled in {pulled['seconds']:.1f} s, blocks {by_letter}", file=sys.stderr)
    return out


def pull_section(size: int, reps: int, tmp: Path, seed: int, bulk: bool, uplink_mbs: float = 0.0) -> dict[str, Any]:
    """Five daemons (the bulk channel on or off, uploads capped at `uplink_mbs` MB/s each if > 0); per repetition
    A publishes, B, C, D, E pull (1, 2, 3, 4 providers); all stopped after."""
    daemons: dict[str, Daemon] = {}
    result: dict[str, Any] = {"bytes": size, "bulk": bulk, "uplink_mbs": uplink_mbs, "reps": []}
    tmp = tmp / (("bulk" if bulk else "libp2p") + (f"-uplink-{uplink_mbs:g}" if uplink_mbs else ""))
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        for letter in "ABCDE":
            previous = list(daemons.values())[-1:]
            extra = {"MIRADOR_P2P_BOOTSTRAP": peers_of(previous[0])["listen_addrs"][0]} if previous else {}
            extra["MIRADOR_P2P_BULK"] = "true" if bulk else "false"
            extra["MIRADOR_P2P_UPLOAD_LIMIT_MBS"] = str(uplink_mbs)
            daemons[letter] = start_daemon(tmp / f"daemon-{letter}", extra)
        result["start_s"] = time.perf_counter() - t0
        ids = {letter: peers_of(d)["peer_id"] for letter, d in daemons.items()}
        result["peer_ids"] = ids
        result["discovery_s"] = wait_until_all_known(list(daemons.values()), list(ids.values()))
        letter_of = {peer: letter for letter, peer in ids.items()}
        for rep in range(reps):
            result["reps"].append(pull_rep(daemons, letter_of, size, tmp, rep, seed))
    except BaseException:
        for letter, d in daemons.items():
            tail = "\n".join(d.log().splitlines()[-15:])
            print(f"--- daemon {letter} log (last lines) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        stop_daemons(daemons)
    return result


def speeds_note(size: int, seconds: list[float]) -> str:
    """'1.23 s; reps 45.6 78.9' (median seconds, MB/s of each repetition)."""
    return f"{statistics.median(seconds):.2f} s; reps " + " ".join(f"{size / s / 1e6:.1f}" for s in seconds)


def pull_rows(result: dict[str, Any]) -> list[Row]:
    """Table rows of the pull section: medians over repetitions, ratios against B's 1-provider pull of each rep."""
    size = result["bytes"]
    reps = result["reps"]
    section = f"pull {size // MIB} MiB {'bulk' if result['bulk'] else 'libp2p'}"
    if result.get("uplink_mbs"):
        section += f" up {result['uplink_mbs']:g}"
    rows: list[Row] = []
    for key, what, note in [
        ("embedded_add_s", "EmbeddedStore.add (local disk ref)", ""),
        ("publish_s", "A: mirador model publish --no-bench", "; CLI start, sha256, add, sign, copy, announce"),
    ]:
        seconds = [r[key] for r in reps]
        rows.append(
            {
                "section": section,
                "what": what,
                "value": size / statistics.median(seconds) / 1e6,
                "p90": None,
                "unit": "MB/s",
                "notes": speeds_note(size, seconds) + note,
            }
        )
    for i, letter in enumerate("BCDE"):
        pulls = [r["pulls"][i] for r in reps]
        seconds = [p["seconds"] for p in pulls]
        vs_one = [r["pulls"][0]["seconds"] / p["seconds"] for r, p in zip(reps, pulls, strict=True)]
        windows = [
            size / (last - first) / 1e6 for first, last in (p["transfer_window_s"] for p in pulls) if last > first
        ]
        blocks = " ".join(f"{k}:{v}" for k, v in sorted(pulls[-1]["blocks_by_provider"].items()))
        failures = [p["done"].get("provider_failures") for p in pulls if p["done"].get("provider_failures")]
        puller_cpu = [p["cpu_s"][letter] / p["seconds"] for p in pulls]
        others_cpu = [sum(v for k, v in p["cpu_s"].items() if k != letter) / p["seconds"] for p in pulls]
        notes = speeds_note(size, seconds) + f"; vs 1 provider {statistics.median(vs_one):.2f}"
        notes += f"; CPU puller {statistics.median(puller_cpu):.0%}, others {statistics.median(others_cpu):.0%}"
        if windows:
            notes += f"; fetch window {statistics.median(windows):.0f} MB/s"
        notes += f"; blocks (last rep) {blocks}" + (f"; failures {failures}" if failures else "")
        rows.append(
            {
                "section": section,
                "what": f"{letter} pulls, {pulls[0]['providers_expected']} provider(s)",
                "value": size / statistics.median(seconds) / 1e6,
                "p90": None,
                "unit": "MB/s",
                "notes": notes,
            }
        )
    return rows


# --- main ---------------------------------------------------------------------------------------------------------


def run_dht(n: int, records: int, rng: random.Random, converge_s: float) -> tuple[dict[str, Any], list[Row]]:
    """The DHT section for one network size: its result and table rows."""
    result = trio.run(dht_network, n, records, rng, converge_s)
    return result, dht_rows(result)


def run_transfer(size: int, reps: int, tmp: Path, seed: int) -> tuple[dict[str, Any], list[Row]]:
    """The transfer section (in one process, then with the provider in another): its result and table rows."""
    result = trio.run(transfer_section, size, reps, tmp, seed)
    result["two_processes"] = trio.run(two_process_transfer, size, reps, tmp, seed)
    return result, transfer_rows(result) + two_process_rows(result["two_processes"])


async def serve_provider(blocks: Path) -> None:
    """The provider process of the two-process transfer: sink, block server and bulk channel over `blocks`; prints
    its address, serves until its stdin closes."""
    async with trio.open_nursery() as nursery:
        provider = await nursery.start(P2PNode(Identity.generate(), BARE_CONFIG).run)
        provider.set_stream_handler(SINK_PROTOCOL, sink_handler)
        BlockServer(BlockStore(blocks)).attach(provider)
        bulk = BulkServer(BlockStore(blocks))
        bulk.attach(provider)
        print(provider.listen_addrs[0], flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        bulk.stop()
        provider.stop()


async def two_process_transfer(size: int, reps: int, tmp: Path, seed: int) -> dict[str, Any]:
    """Raw stream and both fetches from a provider running in its own process, `reps` interleaved runs."""
    rng = random.Random(seed + 1)
    src = tmp / "transfer2.bin"
    with open(src, "wb") as f:
        for left in range(size, 0, -MIB):
            f.write(rng.randbytes(min(left, MIB)))
    payload = rng.randbytes(WRITE_SIZE)
    _, cid = timed_add(src, tmp / "provider2-blocks")
    src.unlink()
    root = Cid.parse(cid)
    seconds: dict[str, list[float]] = {"raw": [], "fetch": [], "bulk": []}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-provider", str(tmp / "provider2-blocks")]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        addr = (await trio.to_thread.run_sync(proc.stdout.readline)).strip()
        async with trio.open_nursery() as nursery:
            client = await nursery.start(P2PNode(Identity.generate(), BARE_CONFIG).run)
            try:
                peer = await client.connect(addr)
                for rep in range(reps):
                    seconds["raw"].append(await raw_push(client, peer, size, payload))
                    for key, bulk in (("fetch", False), ("bulk", True)):
                        os.sync()
                        dest = tmp / f"fetched2-{key}-{rep}"
                        seconds[key].append(await fetch_once(client, peer, root, dest, size, bulk=bulk))
                        shutil.rmtree(dest)
                    print(f"two-process transfer rep {rep + 1}/{reps} done", file=sys.stderr)
            finally:
                client.stop()
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {
        "bytes": size,
        "seconds": seconds,
        "fetch_over_raw_speed": [r / f for r, f in zip(seconds["raw"], seconds["fetch"], strict=True)],
        "bulk_over_raw_speed": [r / b for r, b in zip(seconds["raw"], seconds["bulk"], strict=True)],
    }


def two_process_rows(result: dict[str, Any]) -> list[Row]:
    """Table rows of the two-process transfer."""
    size, rows = result["bytes"], []
    for key, label in (
        ("raw", "raw libp2p stream, 2 processes"),
        ("fetch", "fetch_dag, libp2p protocol, 2 proc"),
        ("bulk", "fetch_dag, bulk channel, 2 proc"),
    ):
        secs = result["seconds"][key]
        notes = f"{statistics.median(secs):.2f} s; reps " + " ".join(f"{size / s / 1e6:.1f}" for s in secs)
        if key != "raw":
            notes += f"; /raw libp2p {statistics.median(result[f'{key}_over_raw_speed']):.3f}"
        rows.append(
            {
                "section": f"transfer {size // MIB} MiB",
                "what": label,
                "value": statistics.median([size / s / 1e6 for s in secs]),
                "p90": None,
                "unit": "MB/s",
                "notes": notes,
            }
        )
    return rows


def bulk_vs_libp2p_rows(libp2p: dict[str, Any], bulk: dict[str, Any]) -> list[Row]:
    """Per provider count: the bulk pull's speed over the libp2p pull's (medians of each)."""
    size, rows = bulk["bytes"], []
    for i, letter in enumerate("BCDE"):
        medians = [statistics.median([r["pulls"][i]["seconds"] for r in x["reps"]]) for x in (libp2p, bulk)]
        rows.append(
            {
                "section": f"pull {size // MIB} MiB ratio",
                "what": f"{letter}: bulk / libp2p, {i + 1} provider(s)",
                "value": medians[0] / medians[1],
                "p90": None,
                "unit": "x",
                "notes": f"{medians[0]:.2f} s -> {medians[1]:.2f} s",
            }
        )
    return rows


def run_pull(size: int, reps: int, tmp: Path, seed: int, uplink_mbs: float) -> tuple[dict[str, Any], list[Row]]:
    """The daemons' pull section, the libp2p block protocol then the bulk channel (then the bulk channel with
    uploads capped, if `uplink_mbs`): results and table rows."""
    libp2p = pull_section(size, reps, tmp, seed, bulk=False)
    bulk = pull_section(size, reps, tmp, seed, bulk=True)
    rows = pull_rows(libp2p) + pull_rows(bulk) + bulk_vs_libp2p_rows(libp2p, bulk)
    out = {"libp2p": libp2p, "bulk": bulk}
    if uplink_mbs:
        out["capped"] = capped = pull_section(size, reps, tmp, seed, bulk=True, uplink_mbs=uplink_mbs)
        rows += pull_rows(capped)
    return out, rows


def print_table(rows: list[Row]) -> None:
    """One table of every row."""
    print(f"{'section':18} {'what':38} {'value':>9} {'p90':>9} {'unit':5} notes")
    for r in rows:
        p90 = f"{r['p90']:9.1f}" if r["p90"] is not None else f"{'':9}"
        print(f"{r['section']:18} {r['what']:38} {r['value']:9.1f} {p90} {r['unit']:5} {r['notes']}")


def main() -> None:
    """Run the benchmark and write the results."""
    if sys.argv[1:2] == ["--serve-provider"]:  # the provider process of the two-process transfer
        trio.run(serve_provider, Path(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 nodes, 10 records, 16 MiB transfer, 20 MiB model")
    ap.add_argument("--no-dht", action="store_true", help="skip the DHT section")
    ap.add_argument("--no-transfer", action="store_true", help="skip the transfer section")
    ap.add_argument("--no-pull", action="store_true", help="skip the daemons' pull section")
    ap.add_argument("--nodes", default=None, help="comma-separated network sizes (default 8,32; quick 8)")
    ap.add_argument("--records", type=int, default=None, help="records per network size (default 20; quick 10)")
    ap.add_argument("--converge-s", type=float, default=60.0, help="bound on the routing-table convergence")
    ap.add_argument("--transfer-mib", type=int, default=None, help="default 64; quick 16")
    ap.add_argument("--reps", type=int, default=3, help="transfer repetitions")
    ap.add_argument("--model-mib", type=int, default=None, help="default 100; quick 20")
    ap.add_argument("--pull-reps", type=int, default=None, help="publish + 4 pulls repetitions (default 3; quick 1)")
    ap.add_argument(
        "--uplink-mbs", type=float, default=0.0, help="also pull with every daemon's uploads capped (MB/s; 0: skip)"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "p2p.json")
    args = ap.parse_args()
    sizes = [int(x) for x in (args.nodes or ("8" if args.quick else "8,32")).split(",")]
    records = args.records or (10 if args.quick else 20)
    transfer_mib = args.transfer_mib or (16 if args.quick else 64)
    model_mib = args.model_mib or (20 if args.quick else 100)
    pull_reps = args.pull_reps or (1 if args.quick else 3)
    rng = random.Random(args.seed)
    libp2p_log = logging.getLogger("libp2p")
    counter = LogCounter()
    libp2p_log.addHandler(counter)
    libp2p_log.propagate = False

    rows: list[Row] = []
    result: dict[str, Any] = run_header("libp2p") | {
        "seed": args.seed,
        "sections": {},
    }
    t_start = time.perf_counter()
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-p2p-") as tmp_name:
        tmp = Path(tmp_name)
        sections: list[tuple[str, Callable[[], tuple[Any, list[Row]]]]] = []
        if not args.no_dht:
            for n in sizes:
                sections.append((f"dht N={n}", partial(run_dht, n, records, rng, args.converge_s)))
        if not args.no_transfer:
            sections.append(("transfer", partial(run_transfer, transfer_mib * MIB, args.reps, tmp, args.seed)))
        if not args.no_pull:
            sections.append(("pull", partial(run_pull, model_mib * MIB, pull_reps, tmp, args.seed, args.uplink_mbs)))
        for name, run in sections:
            t0, load0 = time.perf_counter(), load()
            try:
                section, section_rows = run()
            except Exception as exc:  # one broken section must not lose the others' results
                print(f"section {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                section, section_rows = {"error": f"{type(exc).__name__}: {exc}"}, []
                failed.append(name)
            section |= {"load_before": load0, "load_after": load(), "section_s": time.perf_counter() - t0}
            result["sections"][name] = section
            rows += section_rows
            print(f"section {name} done in {section['section_s']:.0f} s", file=sys.stderr)

    result |= {
        "load_after": load(),
        "total_s": time.perf_counter() - t_start,
        "libp2p_warnings_in_process": counter.top(),
        "rows": rows,
    }
    print_table(rows)
    for text, count in counter.top(5).items():
        print(f"py-libp2p warning x{count}: {text}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"py-libp2p {result['libp2p']}, {result['cpu_count']} CPUs, load {result['load_before']} before, "
        f"{result['load_after']} after; {result['total_s']:.0f} s; wrote {args.out}"
    )
    if failed:
        sys.exit(f"failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
