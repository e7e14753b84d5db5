"""A seeded fuzzer against a real daemon: malformed and adversarial messages on every protocol the node speaks.

One daemon (`mirador node start`, its own process, 127.0.0.1) that created an HE federation (so the join handler has
a federation to admit to) and published an artifact (so the block server has blocks). A fuzzing libp2p host in this
process sends, per protocol, valid messages mutated by a seeded RNG:

- fed.join     /mirador/fed/join/1.0.0: signed join requests (bit flips, truncation, extension, fields dropped,
               wrong types, huge strings, duplicated keys, garbage), framed, and raw frame headers (bad magic,
               lengths up to 2^64 - 1, another message type)
- fed.update   /mirador/fed/update/1.0.0: signed update headers mutated the same way, then a payload
- blocks       /mirador/blocks/1.0.0: wants (mutated JSON, 0 or 65 CIDs, CIDs that do not parse) and raw frames
- bulk         the bulk channel: mutated `bulk.open` frames on /mirador/blocks-bulk/2.0.0; raw bytes on its TCP
               port (guessed session ids, garbage, huge lengths); and, behind a genuine ticket and hello, sealed
               records holding mutated wants, records that do not open, and lengths up to 2^32 - 1
- dht          /ipfs/kad/1.0.0: PUT_VALUE of mutated signed registry records under mutated keys, GET_VALUE of
               random keys, and raw length-prefixed garbage on the stream
- notices      gossipsub: mutated notices published on /mirador/notices/1
- http         the API: mutated JSON bodies on every POST route (with the home token, as JSON, so they reach the
               routes), random paths and methods

A host the daemon blacklists (every refusal costs score) is replaced by a fresh identity. Each message waits at most
`--wait-s` for an answer, then its stream is closed; "hangs" counts messages whose stream the daemon neither
answered nor closed in that time (its own read deadlines end them later). After each session the daemon must still
run; at the end it must answer a chat, serve the artifact's blocks and answer a DHT query for its registry record to a
fresh host. RSS is the daemon's VmRSS.
Prints a table per protocol and writes bench/results/fuzz.json.

    .venv/bin/python bench/fuzz.py [--messages 10000] [--seed 1] [--wait-s 0.5]
"""

import argparse
import base64
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_header, write_json
from crypto.identity import Identity
from crypto.sealing import x25519_public_of
from federation.descriptor import sign_join
from federation.messages import sign_update_header
from marketplace.blockstore import BlockStore
from marketplace.cid import Cid
from marketplace.registry import Registry
from marketplace.registry_record import record_key, sign_record
from node.fed import wire as fed_wire
from node.market.block_exchange import PROTOCOL as BLOCKS
from node.market.block_exchange import encode_want, fetch_dag
from node.market.bulk import (
    CONTROL_PROTOCOL,
    HELLO,
    OPEN,
    READY,
    TICKET,
    BulkError,
    SealedSocket,
    TicketDoc,
    channel_keys,
    open_channel,
)
from node.market.registry_dht import registry_node
from node.p2p.framing import HEADER_SIZE, ByteStream, Kind, encode_header, receive_frame, send_frame
from node.p2p.host import P2PConfig, P2PNode
from node.p2p.notices import TOPIC
from tests.daemon_harness import Daemon, start_daemon

PROTOCOLS = ("fed.join", "fed.update", "blocks", "bulk", "dht", "notices", "http")
KAD = "/ipfs/kad/1.0.0"
CONFIG = P2PConfig(dial_timeout=5, negotiate_timeout=5)
MAX_REFUSED_CONNECTS = 5  # consecutive refused connections before the rest of a protocol's messages are skipped
SESSION = 200  # messages per fuzzing host before a fresh one (a blacklisted host is replaced at once)
POST_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/feedback",
    "/v1/train",
    "/v1/federations",
    "/v1/federations/join",
    "/v1/market/announce",
    "/v1/market/pull",
    "/v1/node/connect",
)


# --- mutations ----------------------------------------------------------------------------------------------------


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """One byte-level mutation: bit flips, truncation, extension, a splice of random bytes, or all garbage."""
    choice = rng.randrange(6)
    buf = bytearray(data)
    if choice == 0 and buf:
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif choice == 1:
        buf = buf[: rng.randrange(len(buf) + 1)]
    elif choice == 2:
        buf += os.urandom(rng.choice((1, 7, 100, 4096)))
    elif choice == 3 and buf:
        at = rng.randrange(len(buf))
        buf[at : at + rng.randint(1, 16)] = os.urandom(rng.randint(0, 16))
    elif choice == 4:
        buf = bytearray(rng.randbytes(rng.choice((0, 1, 61, 500, 5000))))
    else:
        buf = bytearray(data * rng.randint(2, 4))
    return bytes(buf)


def mutate_json(rng: random.Random, data: bytes) -> bytes:
    """One structural mutation of a JSON object: a field dropped, retyped, made huge, duplicated, or nested deep."""
    try:
        doc = json.loads(data)
    except ValueError:
        return mutate_bytes(rng, data)
    if not isinstance(doc, dict) or not doc:
        return mutate_bytes(rng, data)
    key = rng.choice(sorted(doc))
    choice = rng.randrange(7)
    if choice == 0:
        del doc[key]
    elif choice == 1:
        doc[key] = rng.choice([None, True, -1, 2**70, 1e308, "", [], {}, "x" * 10_000, [1] * 1000])
    elif choice == 2:
        doc[f"unknown_{rng.randrange(100)}"] = "?"
    elif choice == 3:  # a duplicated key: only text can say it
        text = json.dumps(doc)
        return (text[:-1] + f', "{key}": {json.dumps(rng.choice([0, "dup", None]))}}}').encode()
    elif choice == 4:  # deep nesting, written as text (the encoder would recurse too)
        depth = rng.choice((10, 100, 1000, 100_000))
        doc[key] = "@@nested@@"
        return json.dumps(doc).replace('"@@nested@@"', "[" * depth + "0" + "]" * depth).encode()
    elif choice == 5:
        doc[key] = str(doc[key])[::-1] if isinstance(doc[key], str) else -abs(hash(str(doc[key])))
    else:
        return mutate_bytes(rng, json.dumps(doc).encode())
    return json.dumps(doc).encode()


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A JSON-aware or byte-level mutation, half and half."""
    return mutate_json(rng, data) if rng.random() < 0.5 else mutate_bytes(rng, data)


def frame(rng: random.Random, msg_type: str, payload: bytes) -> bytes:
    """A data frame around `payload`, or (one time in five) a header that lies: length, digest, magic or type."""
    digest = hashlib.sha256(payload).digest()
    choice = rng.randrange(5)
    if choice == 0:
        return encode_header(Kind.DATA, msg_type, rng.choice((0, 2**31, 2**64 - 1)), digest) + payload
    if choice == 1:
        return encode_header(Kind.DATA, msg_type, len(payload), bytes(32)) + payload
    if choice == 2:
        return rng.randbytes(HEADER_SIZE) + payload
    return encode_header(Kind.DATA, msg_type, len(payload), digest) + payload


# --- the protocols ------------------------------------------------------------------------------------------------


class Target:
    """What the fuzzer knows of the daemon: addresses, a valid message of each kind, the artifact's envelope."""

    def __init__(self, d: Daemon, fid: str, envelope_cid: str, record: bytes, publisher: str) -> None:
        self.d, self.fid, self.envelope_cid, self.record, self.publisher = d, fid, envelope_cid, record, publisher
        self.addr = httpx.get(f"{d.url}/v1/node/peers", timeout=10).json()["listen_addrs"][0]
        self.bulk_port: int | None = None  # learnt from the first genuine ticket


class Tally:
    """Counts per protocol: sent, answered, closed, hangs (no answer in the wait), refused locally, HTTP statuses."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {p: Counter() for p in PROTOCOLS}

    def add(self, protocol: str, outcome: str) -> None:
        """Count one message's outcome."""
        self.counts[protocol]["sent"] += 1
        self.counts[protocol][outcome] += 1


async def raw_exchange(node: P2PNode, peer: Any, protocol: str, data: bytes, wait_s: float) -> str:
    """Open a stream, write `data`, read for `wait_s`: answered (bytes came back), closed, or hang."""
    stream = await node.open_stream(peer, protocol)
    try:
        await stream.write(data)
        with trio.move_on_after(wait_s):
            answer = await stream.read(HEADER_SIZE)
            return "answered" if answer else "closed"
        return "hang"
    except (ConnectionResetError, OSError):
        return "closed"
    finally:
        with trio.move_on_after(1):
            await stream.close()


async def one_message(
    protocol: str, rng: random.Random, node: P2PNode, peer: Any, target: Target, identity: Identity, wait_s: float
) -> str:
    """Send one mutated message of `protocol`; its outcome."""
    if protocol == "fed.join":
        role = rng.choice(("member", "aggregator"))
        valid = sign_join(identity, target.fid, base64.b64encode(x25519_public_of(identity)).decode(), role=role)
        return await raw_exchange(
            node, peer, fed_wire.JOIN_PROTOCOL, frame(rng, "fed.join", mutate(rng, valid)), wait_s
        )
    if protocol == "fed.update":
        payload = rng.randbytes(rng.choice((1, 64, 4096)))
        header = sign_update_header(
            identity,
            federation_id=target.fid,
            round=rng.randint(1, 5),
            layout_digest=hashlib.sha256(payload).hexdigest(),
            kind=rng.choice(("plain", "ckks")),
            payload=payload,
        )
        data = frame(rng, "fed.header", mutate(rng, header)) + frame(rng, "fed.payload", payload)
        return await raw_exchange(node, peer, fed_wire.UPDATE_PROTOCOL, data, wait_s)
    if protocol == "blocks":
        want = encode_want([Cid.parse(target.envelope_cid)])
        return await raw_exchange(node, peer, BLOCKS, frame(rng, "blocks.want", mutate(rng, want)), wait_s)
    if protocol == "bulk":
        return await bulk_message(rng, node, peer, target, wait_s)
    if protocol == "dht":
        assert node.dht is not None
        choice = rng.randrange(3)
        if choice == 0:
            key = record_key("fuzz", target.publisher) if rng.random() < 0.5 else mutate_bytes(rng, b"/mirador/x")
            key_bytes = key.encode() if isinstance(key, str) else key
            with trio.move_on_after(wait_s * 4):
                stored = await node.dht.value_store._store_at_peer(peer, key_bytes, mutate(rng, target.record))
                return "refused" if not stored else "stored"
            return "hang"
        if choice == 1:
            with trio.move_on_after(wait_s * 4):
                await node.dht.value_store._get_from_peer(peer, rng.randbytes(rng.choice((0, 10, 200))))
                return "answered"
            return "hang"
        garbage = rng.randbytes(rng.choice((1, 10, 1000)))
        length = rng.choice((len(garbage), 2**20, 2**31))
        prefix = bytes([(length >> (7 * i) & 0x7F) | (0x80 if length >> (7 * (i + 1)) else 0) for i in range(5)])
        return await raw_exchange(node, peer, KAD, prefix.rstrip(b"\x00") + garbage, wait_s)
    if protocol == "notices":
        assert node.pubsub is not None
        notice = {"type": "node.hello", "v": 1, "sent_at": int(time.time()), "agent": "fuzz"}
        await node.pubsub.publish(TOPIC, mutate(rng, json.dumps(notice).encode()))
        return "published"
    raise ValueError(protocol)


async def bulk_message(rng: random.Random, node: P2PNode, peer: Any, target: Target, wait_s: float) -> str:
    """One hostile message to the bulk channel: a mutated ticket request, raw bytes on its port, or a genuine
    channel carrying a mutated or unsealed record."""
    choice = rng.randrange(3)
    if choice == 0 or target.bulk_port is None:
        open_request = json.dumps({"v": 1}).encode()
        outcome = await raw_exchange(node, peer, CONTROL_PROTOCOL, frame(rng, OPEN, mutate(rng, open_request)), wait_s)
        if target.bulk_port is None:  # learn the port from one genuine ticket
            target.bulk_port = (await bulk_ticket(node, peer))[0]
        return outcome
    if choice == 1:
        garbage = rng.randbytes(16) + mutate_bytes(rng, rng.randbytes(rng.choice((0, 4, 36, 5000))))
        return await trio.to_thread.run_sync(tcp_exchange, target.bulk_port, garbage, b"", None, wait_s)
    port, session, key = await bulk_ticket(node, peer)
    if rng.random() < 0.5:
        record = mutate(rng, encode_want([Cid.parse(target.envelope_cid)]))
        return await trio.to_thread.run_sync(tcp_exchange, port, session, key, record, wait_s)
    raw = rng.choice(
        (rng.randbytes(rng.choice((4, 20, 300))), (2**32 - 1).to_bytes(4, "big"), (20).to_bytes(4, "big") + bytes(20))
    )
    return await trio.to_thread.run_sync(tcp_exchange, port, session, key, raw, wait_s, False)


async def bulk_ticket(node: P2PNode, peer: Any) -> tuple[int, bytes, bytes]:
    """(port, session id, key) of a genuine ticket from the daemon."""
    stream = await node.open_stream(peer, CONTROL_PROTOCOL)
    try:
        await send_frame(stream, OPEN, b'{"v":1}', write_timeout=5, ack_timeout=5)
        ticket = json.loads((await receive_frame(stream, {TICKET: 512}, read_timeout=5)).payload)
    finally:
        with trio.move_on_after(1):
            await stream.close()
    doc = TicketDoc(**ticket)
    return doc.port, base64.b64decode(doc.session), base64.b64decode(doc.key)


def tcp_exchange(
    port: int, session: bytes, key: bytes, record: bytes | None, wait_s: float, sealed: bool = True
) -> str:
    """Connect to the bulk port and send `session` (with the genuine hello if `key`), then `record` (sealed under
    the channel's key, or as raw bytes); answered, closed, or hang within `wait_s`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
            if key:
                send_key, recv_key = channel_keys(key, session)
                channel = SealedSocket(sock, send_key, recv_key)
                sock.sendall(session + channel.seal(HELLO) + (channel.seal(record or b"") if sealed else record or b""))
                try:
                    channel.recv(len(READY))  # the channel opened; what follows answers `record`
                except BulkError:
                    return "closed"
            else:
                sock.sendall(session)
            try:
                return "answered" if sock.recv(64) else "closed"
            except TimeoutError:
                return "hang"
    except (ConnectionError, OSError):
        return "closed"


def http_message(rng: random.Random, target: Target, client: httpx.Client) -> str:
    """One mutated API request; its HTTP status class (5xx would be an unhandled error)."""
    token = (target.d.home / "api.token").read_text().strip()
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": "hi"}],
        "prompt": "hi",
        "max_tokens": 2,
        "name": "fuzz",
        "target": target.envelope_cid,
        "data": str(target.d.home / "data" / "notes.txt"),
        "adapter": "fuzz",
        "completion_id": "x",
        "rating": 3,
        "addr": target.addr,
    }
    path = rng.choice(POST_ROUTES)
    method = "POST"
    if rng.random() < 0.1:
        path = "/" + "/".join(rng.choice(("v1", "..", "%00", "x" * 300, "federations", "")) for _ in range(3))
        method = rng.choice(("GET", "POST", "DELETE", "PUT"))
    try:
        resp = client.request(method, path, content=mutate(rng, json.dumps(body).encode()), headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        return f"transport {type(exc).__name__}"
    return f"{resp.status_code // 100}xx"


async def session(protocol: str, count: int, rng: random.Random, target: Target, tally: Tally, wait_s: float) -> None:
    """`count` messages of `protocol` from fresh hosts (one per SESSION messages, or when the daemon drops it)."""
    left, refused_in_a_row = count, 0
    while left > 0:
        if (
            refused_in_a_row >= MAX_REFUSED_CONNECTS
        ):  # the daemon stopped taking our connections: counted, not waited on
            for _ in range(left):
                tally.add(protocol, "not_sent (connections refused)")
            return
        identity = Identity.generate()
        node, _ = registry_node(identity, CONFIG)
        async with node:
            try:
                with trio.fail_after(10):
                    peer = await node.connect(target.addr)
            except Exception:
                tally.add(protocol, "connect_refused")
                left -= 1
                refused_in_a_row += 1
                continue
            refused_in_a_row = 0
            for _ in range(min(SESSION, left)):
                left -= 1
                try:
                    outcome = await one_message(protocol, rng, node, peer, target, identity, wait_s)
                except Exception as exc:  # the daemon dropped us (blacklisted), or the library refused to send
                    tally.add(protocol, f"dropped {type(exc).__name__}")
                    break
                tally.add(protocol, outcome)
        if target.d.proc.poll() is not None:
            raise RuntimeError(f"the daemon died during {protocol}: exit {target.d.proc.returncode}")


def handler_errors(log: str) -> list[str]:
    """The last line of each traceback the daemon logged for a stream that failed (a bug, not a refusal)."""
    found, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if "failed; it alone was dropped" in line:
            tail = next((t for t in lines[i + 1 : i + 80] if t and not t.startswith((" ", "Traceback", "+", "|"))), "")
            found.append(tail[:300])
    return found


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def prepare(root: Path) -> Target:
    """Start the daemon, create an HE federation, publish an artifact; what the fuzzer needs to know."""
    d = start_daemon(root / "victim")
    try:
        return _prepared(d, root)
    except BaseException:
        d.stop()
        raise


def _prepared(d: Daemon, root: Path) -> Target:
    """Create the federation, publish the artifact, read what the fuzzer needs."""
    (d.home / "data").mkdir()
    (d.home / "data" / "notes.txt").write_text("notes\n")
    spec = {"name": "fuzzed", "mode": "he", "data": str(d.home / "data" / "notes.txt"), "min_members": 3}
    created = httpx.post(f"{d.url}/v1/federations", json=spec, headers=d.auth, timeout=120)
    created.raise_for_status()
    (root / "model.txt").write_text("a model to serve\n")
    env = {**os.environ, "MIRADOR_HOME": str(d.home)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "model",
            "publish",
            str(root / "model.txt"),
            "--name",
            "fuzzed",
            "--version",
            "1.0.0",
            "--no-bench",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"publish failed: {done.stderr}")
    registry = Registry(d.home / "state.db")  # WAL: read beside the running daemon
    try:
        published = registry.find("fuzzed")
    finally:
        registry.close()
    if published is None:
        raise RuntimeError("the published artifact is not in the registry")
    envelope = published.root_cid
    identity_fp = httpx.get(f"{d.url}/v1/node/status", timeout=10).json()["node"]["identity"]
    record = sign_record(Identity.generate(), "fuzz", {"1.0.0": envelope}, seq=1)
    return Target(d, created.json()["federation_id"], envelope, record, identity_fp)


async def still_serving(target: Target, scratch: Path) -> tuple[bool, bool]:
    """(blocks, dht): a fresh host fetches the published artifact's envelope from the daemon over the block exchange,
    and reads the daemon's registry record for it from the daemon's DHT."""
    node, _ = registry_node(Identity.generate(), CONFIG)
    async with node:
        peer = await node.connect(target.addr)
        store = BlockStore(scratch)

        async def open_stream(p: Any) -> ByteStream:
            return await node.open_stream(p, BLOCKS)

        async def open_bulk(p: Any) -> Any:
            return await open_channel(node, p)

        with trio.fail_after(30):
            report = await fetch_dag(Cid.parse(target.envelope_cid), [peer], open_stream, store, open_bulk=open_bulk)
        if report.channels != {str(peer): "bulk"}:
            raise RuntimeError(f"the envelope came over {report.channels}, not the bulk channel")
        assert node.dht is not None
        with trio.move_on_after(30):
            key = record_key("fuzzed", target.publisher).encode()
            value = await node.dht.value_store._get_from_peer(peer, key)
            return True, isinstance(value, bytes) and bool(value)
        return True, False


def run_fuzz(root: Path, messages: int, seed: int, wait_s: float = 0.5) -> dict[str, Any]:
    """Fuzz a fresh daemon under `root` with `messages` messages spread over the protocols; the report."""
    rng = random.Random(seed)
    target = prepare(root)
    d = target.d
    try:
        pid = d.pid
        rss_before = rss_kib(pid)
        tally = Tally()
        per = messages // len(PROTOCOLS)
        started = time.perf_counter()
        timings: dict[str, float] = {}
        for protocol in PROTOCOLS:
            t0 = time.perf_counter()
            if protocol == "http":
                with httpx.Client(base_url=d.url) as client:
                    for _ in range(per):
                        tally.add("http", http_message(rng, target, client))
            else:
                trio.run(session, protocol, per, rng, target, tally, wait_s)
            timings[protocol] = time.perf_counter() - t0
            if d.proc.poll() is not None:
                raise RuntimeError(f"the daemon died during {protocol}")
        chat = d.chat().status_code
        try:
            served, dht_answers = trio.run(still_serving, target, root / "fetched")
            after_error = ""
        except Exception as exc:  # reported, not raised: the counts above are the run's result
            served, dht_answers, after_error = False, False, f"{type(exc).__name__}: {str(exc)[:300]}"
        status = httpx.get(f"{d.url}/v1/node/status", timeout=10).json()
        return {
            "seed": seed,
            "messages": per * len(PROTOCOLS),
            "seconds": time.perf_counter() - started,
            "per_protocol": {p: dict(c) for p, c in tally.counts.items()},
            "seconds_per_protocol": timings,
            "alive": d.proc.poll() is None,
            "chat_status": chat,
            "blocks_served": served,
            "dht_answers": dht_answers,
            "after_error": after_error,
            "rss_kib_before": rss_before,
            "rss_kib_after": rss_kib(pid),
            "stream_refusals": status["p2p"].get("stream_refusals", {}),
            "notices_refused": status["p2p"].get("notices", {}).get("refused", {}),
            "blacklisted": len(status["p2p"].get("notices", {}).get("blacklisted", {})),
            "handler_errors": handler_errors(d.log()),
        }
    finally:
        d.stop()


def print_table(report: dict[str, Any]) -> None:
    """The per-protocol counts and the checks after the run."""
    print(f"\nfuzz: {report['messages']} messages, seed {report['seed']}, {report['seconds']:.0f} s")
    print(f"{'protocol':<12}{'sent':>7}  outcomes")
    for protocol, counts in report["per_protocol"].items():
        rest = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "sent")
        print(f"{protocol:<12}{counts.get('sent', 0):>7}  {rest}")
    growth = report["rss_kib_after"] - report["rss_kib_before"]
    print(
        f"daemon alive: {report['alive']}; chat afterwards: {report['chat_status']}; blocks served: "
        f"{report['blocks_served']}; DHT answers: {report['dht_answers']}; "
        f"RSS {report['rss_kib_before'] / 1024:.0f} -> {report['rss_kib_after'] / 1024:.0f} MiB "
        f"({growth / 1024:+.0f} MiB); peers blacklisted: {report['blacklisted']}"
    )
    if report["after_error"]:
        print(f"afterwards a fresh host could not use the node: {report['after_error']}")
    handler_errors = {k: v for k, v in report["stream_refusals"].items() if k.endswith("handler_error")}
    print(f"stream refusals: {report['stream_refusals']}; handler errors (bugs): {handler_errors or 'none'}")


def main() -> None:
    """Parse arguments, fuzz, print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--wait-s", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirador-fuzz-") as tmp:
        report = run_fuzz(Path(tmp), args.messages, args.seed, args.wait_s)
    print_table(report)
    write_json(
        Path(__file__).resolve().parent / "results" / "fuzz.json", run_header("libp2p", "httpx") | {"fuzz": report}
    )


if __name__ == "__main__":
    main()
