"""Federation rounds: round overhead without training (P2P, dp / he / he+dp), HE cost per client, Flower's engine.

Three sections, each one skippable:

p2p: N FederationNode instances in one trio loop on 127.0.0.1, composed as the daemon composes them (real libp2p
hosts with DHT and gossipsub, NoticeBoard, EmbeddedStore + BlockServer, FederationStore, ledger, AdapterStore),
for N in --nodes and each mode in --modes. The only change is the injected `Trainer`: it returns the global
tensors plus a fixed seeded random delta (norm ~0.5, under the clip norm) at once, so what is timed is a real round
minus training: RoundOpen gossip, privatize (clip + noise + safetensors, or CKKS encrypt + serialize), the framed
update stream, the aggregator's checks and combine (strategy, or blind CKKS sum), store + DHT provide + RoundDone
gossip, fetch by CID from the providers, decode / decrypt, apply, and `install_global` (GGUF adapter written and
installed). The adapter is the federation's real one for the embedded model (rank 4, alpha 8, q_proj + v_proj:
230,400 float32 values). Under dp every node trains and any node may aggregate; under he and he+dp one of the N
nodes joins as aggregator-only (it never holds the secret key), so N-1 nodes train. quorum = min_members = the
trainers, so a round closes as soon as every trainer sent. Node 0 creates, the others join through it (descriptor
found in the DHT); rounds start by themselves once the last one joined. Phases are the service's own phase
events (`FederationService.events`, node/fed/rounds/events.py), one subscriber per node. Per round, the wall
time runs from the aggregator's RoundOpen (its `fed_rounds.started`) to the last
trainer's new global installed, and the period from the previous round's last install to this one's (rounds
overlap: the next aggregator may open before every member has installed the last global, so the period is the
steady-state cost of a round). --warmup rounds (default 1: its first privacy-ledger check imports opacus, and
connections are still being made) run first and are left out of the medians over rounds; each phase is the median
over the trainers. All N nodes share one Python process (one trio thread, worker threads under the GIL) on this
machine's cores: CKKS work of N members that would run on N machines runs here on 2 cores, so HE phases are upper
bounds, and anything that blocks the event loop stalls every node at once.

he: the per-client costs of the same update vector, as `federation.privacy` and `crypto.he` do them, against the
plaintext path measured in the same run, repetitions interleaved: serialize (safetensors vs CKKS encrypt, then
serialize), bytes on the wire, the aggregator's parse, aggregation of N updates (numpy mean of N vectors, the
reference; plain `combine` with fedavg; `add_encrypted`; CKKS `combine`), and the member's decode vs decrypt.
Ratios are medians of per-repetition ratios.

flower: a SuperLink and N SuperNodes (`node.fed.flower.engine.FlowerDeployment`, separate processes on 127.0.0.1)
run the project's Flower app for --flower-rounds rounds with the same adapter (rank 4, alpha 8, qv, its round-1
tensors given as init-adapter). The ClientApp always trains (local-steps >= 1), so it runs at its smallest: 1 step,
batch 1, 16 tokens, 1 torch thread. The round time is the ServerApp's own (push → every reply → aggregate); the
training part is each member's `train-seconds` metric (data load to update, in the ClientApp). Only dp is supported
by that path (clip + Gaussian noise in the ClientApp, `noise-multiplier`); it has no HE.

Prints tables and writes bench/results/federation.json.

    .venv/bin/python bench/federation.py [--quick] [--nodes 4 8] [--modes dp he he+dp] [--rounds 3] [--warmup 1]
                                         [--reps 5] [--no-p2p] [--no-he] [--no-flower] [--flower-nodes 4 8]
                                         [--flower-modes dp] [--flower-rounds 3]

--quick (a ~2-minute smoke run): 4 nodes, 1 round, no warm-up, 2 repetitions, Flower with 2 SuperNodes for 1 round.
"""

import argparse
import contextlib
import functools
import itertools
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LogCounter, load, non_negative_int, positive_int, run_header, write_json
from crypto.he import (
    EncryptedVector,
    HEParams,
    SecretContext,
    add_encrypted,
    decrypt_vector,
    encrypt_vector,
)
from crypto.identity import Identity
from federation.descriptor import (
    AdapterConfig,
    DpParams,
    FederationDescriptor,
    HeParams,
    Privacy,
    sign_descriptor,
    verify_descriptor,
)
from federation.policy import PrivacyPolicy
from federation.privacy import MAX_PLAIN_BYTES, combine, mean_update, release, round_spend
from federation.update import Layout, decode_tensors, encode_tensors, flatten, unflatten
from marketplace.content_store import EmbeddedStore
from node.adapters.store import AdapterStore
from node.core.home import NodeHome
from node.fed.adapter import base_dims, initial_adapter, peft_config
from node.fed.dht import federation_validators
from node.fed.node import FederationNode
from node.fed.service import PhaseEvent, Trained
from node.inference.models import embedded_model_path
from node.market.block_exchange import BlockServer
from node.market.registry_dht import registry_node
from node.p2p.host import P2PConfig, P2PNode
from node.p2p.notices import TOPIC, NoticeBoard

RANK, ALPHA, TARGETS = 4, 8.0, ("q_proj", "v_proj")
DELTA_NORM = 0.5  # the stub trainer's update norm (under the clip norm 1.0: clipping changes nothing)
CLIP_NORM, NOISE = 1.0, 1.0
# Overhead over many rounds of stub training (no data): a budget no node's default policy would accept.
BENCH_POLICY = PrivacyPolicy(max_epsilon_per_dataset=1e5)
STUB_SAMPLE_RATE = 0.01
DEADLINE_S = 60  # the round deadline; rounds close earlier, as soon as every trainer sent
CONVERGE_S = 30.0
KB = 1000
MODES = ("dp", "he", "he+dp")

Row = dict[str, Any]


# --- logging ------------------------------------------------------------------------------------------------------


def med(values: list[float]) -> float | None:
    """The median, None for no values."""
    return statistics.median(values) if values else None


# --- phase recording ----------------------------------------------------------------------------------------------


@dataclass
class Event:
    """One timed phase: which node, which round, what, when (unix seconds, like the rounds table), bytes moved."""

    node: int
    round: int
    phase: str
    t0: float
    t1: float
    nbytes: int = 0

    @property
    def seconds(self) -> float:
        """Its duration."""
        return self.t1 - self.t0


@dataclass
class Recorder:
    """The phase events of the running configuration, from every node's `service.events`."""

    events: list[Event] = field(default_factory=list)

    def hook(self, index: int) -> Callable[[PhaseEvent], None]:
        """A subscriber for node `index`'s round events."""

        def record(event: PhaseEvent) -> None:
            self.events.append(Event(index, event.round, event.phase, event.started, event.ended, event.nbytes))

        return record


REC = Recorder()


# --- p2p section --------------------------------------------------------------------------------------------------


def stub_trainer(index: int, norm: float = DELTA_NORM) -> Callable[..., Trained]:
    """A Trainer that returns at once: the global tensors plus a delta seeded by (node, round) of L2 norm `norm`."""

    def train(
        descriptor: FederationDescriptor, global_tensors: Mapping[str, np.ndarray], r: int, stop: Any, account: Any
    ) -> Trained:
        # example-level modes: accounted as a DP-SGD run at q = STUB_SAMPLE_RATE would be (the stub trains nothing)
        spend = round_spend(descriptor, STUB_SAMPLE_RATE) if descriptor.example_level else None
        if spend is not None:
            account(spend, "")  # no dataset: the stub reads none
        rng = np.random.default_rng([index, r])
        noise = {k: rng.standard_normal(v.shape) for k, v in sorted(global_tensors.items())}
        scale = norm / float(np.sqrt(sum(float(np.sum(x * x)) for x in noise.values())))
        tensors = {k: (global_tensors[k] + scale * noise[k]).astype(np.float32) for k in global_tensors}
        return Trained(tensors, 24, 1.0, 0.9, spend)

    return train


@dataclass
class BenchNode:
    """One in-process node: what the daemon composes for its federations."""

    index: int
    home: NodeHome
    identity: Identity
    p2p: P2PNode
    notices: NoticeBoard
    local: EmbeddedStore
    fed: FederationNode


def make_node(index: int, root: Path, gguf: Path) -> BenchNode:
    """A node home under `root` with its identity, host (DHT + gossipsub), notices, block store and federations."""
    home = NodeHome(root / f"node-{index}")
    home.ensure()
    identity = Identity.generate()
    config = P2PConfig(listen_host="127.0.0.1", port=0, peers_file=home.run_dir / "peers.json")
    p2p, registry = registry_node(identity, config, federation_validators())
    notices = NoticeBoard()
    local = EmbeddedStore(home.root / "blocks")
    BlockServer(local.blocks).attach(p2p)  # what MarketService does in the daemon: members fetch aggregates here
    adapters = AdapterStore(home.adapters_dir, base_dims(gguf))
    fed = FederationNode(
        home, identity, gguf, adapters, p2p, notices, registry, local, trainer=stub_trainer(index), policy=BENCH_POLICY
    )
    fed.service.events.subscribe(REC.hook(index))
    return BenchNode(index, home, identity, p2p, notices, local, fed)


async def converge(nodes: list[BenchNode], limit_s: float) -> tuple[float, int, int]:
    """Refresh routing tables until each node knows all others and has gossip peers on the topic, or `limit_s`.

    Returns (seconds, smallest routing table, smallest number of topic peers)."""
    t0 = time.perf_counter()
    while True:
        tables = min(len(n.p2p.known_peers()) for n in nodes)
        topic = min(len(n.p2p.pubsub.peer_topics.get(TOPIC, ())) for n in nodes if n.p2p.pubsub is not None)
        if (tables >= len(nodes) - 1 and topic >= 1) or time.perf_counter() - t0 > limit_s:
            return time.perf_counter() - t0, tables, topic
        for n in nodes:
            await n.p2p.discover()
        await trio.sleep(0.1)


def federation_spec(name: str, mode: str, trainers: int) -> dict[str, Any]:
    """`FederationNode.create`'s spec for a bench federation."""
    return {
        "name": name,
        "mode": mode,
        "quorum": trainers,
        "min_members": trainers,
        "round_deadline_s": DEADLINE_S,
        "local_steps": 1,
        "clip_norm": CLIP_NORM,
        "noise_multiplier": NOISE if mode != "he" else 0.0,
        "epsilon_budget": 1e5,
        "rank": RANK,
        "alpha": ALPHA,
        "targets": list(TARGETS),
        "data": None,  # the stub trainer reads nothing
    }


async def wait_rounds(nodes: list[BenchNode], fid: str, rounds: int, timeout: float, tag: str) -> float:
    """Seconds until every node's global round is >= `rounds` (progress printed); TimeoutError after `timeout`."""
    t0 = time.perf_counter()
    reached = 0
    while True:
        done = [n.fed.state.federation(fid) for n in nodes]
        lowest = min(row.global_round if row is not None else 0 for row in done)
        if lowest > reached:
            reached = lowest
            print(
                f"  {tag}: round {reached} applied everywhere after {time.perf_counter() - t0:.1f} s", file=sys.stderr
            )
        if lowest >= rounds:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{tag}: only round {lowest} of {rounds} applied everywhere after {timeout:.0f} s")
        await trio.sleep(0.2)


async def federation_run(n: int, mode: str, rounds: int, warmup: int, root: Path, gguf: Path) -> dict[str, Any]:
    """Start `n` nodes, create + join a `mode` federation, let `warmup` + `rounds` rounds run, stop everything."""
    REC.events.clear()
    he = mode != "dp"
    trainers = n - 1 if he else n
    nodes: list[BenchNode] = []
    tag = f"N={n} {mode}"
    total = warmup + rounds
    out: dict[str, Any] = {"nodes": n, "mode": mode, "trainers": trainers, "rounds": rounds, "warmup": warmup}
    t_setup = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            try:
                for i in range(n):
                    node = make_node(i, root, gguf)
                    nodes.append(node)
                    await nursery.start(node.p2p.run)
                    if i > 0:
                        await node.p2p.connect(nodes[0].p2p.listen_addrs[0])
                    await node.notices.attach(node.p2p)
                    await nursery.start(node.notices.run)
                    await nursery.start(node.fed.service.run)
                out["converge_s"], out["smallest_routing_table"], out["smallest_topic_peers"] = await converge(
                    nodes, CONVERGE_S
                )
                summary = await nodes[0].fed.create(federation_spec(f"bench-{n}", mode, trainers))
                fid, creator = summary["federation_id"], summary["creator"]
                for node in nodes[1:]:
                    role = "aggregator" if he and node is nodes[-1] else "member"
                    await node.fed.join(f"bench-{n}", creator, None, role, None)
                out["setup_s"] = time.perf_counter() - t_setup
                print(f"  {tag}: {n} nodes up and joined in {out['setup_s']:.1f} s", file=sys.stderr)
                out["rounds_s"] = await wait_rounds(nodes, fid, total, (total + 1) * 2.0 * DEADLINE_S, tag)
                out |= round_facts(nodes, fid, total)
            finally:
                for node in nodes:
                    node.p2p.stop()
                nursery.cancel_scope.cancel()
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.fed.state.close()
            with contextlib.suppress(Exception):
                node.local.close()
    return out


def round_facts(nodes: list[BenchNode], fid: str, rounds: int) -> dict[str, Any]:
    """Per round: the aggregator, the rounds-table rows of every node, and the timed phases (see `round_phases`)."""
    index_of = {n.identity.fingerprint: n.index for n in nodes}
    roles = {n.index: n.fed.service.membership.members(fid)[n.identity.fingerprint].role for n in nodes}
    trainers = [i for i, role in roles.items() if role == "member"]
    per_round = []
    for r in range(1, rounds + 1):
        rows = {n.index: next((row for row in n.fed.state.rounds(fid) if row.round == r), None) for n in nodes}
        aggregator = next(index_of[row.aggregator] for row in rows.values() if row is not None and row.aggregator)
        agg_row = rows[aggregator]
        assert agg_row is not None
        statuses = {i: row.status if row is not None else "missing" for i, row in rows.items()}
        events = [e for e in REC.events if e.round == r]
        phases = round_phases(events, aggregator, trainers, agg_row.started)
        phases |= {
            "round": r,
            "aggregator": aggregator,
            "statuses": statuses,
            "contributors": len(agg_row.contributors),
            "applied_everywhere": all(statuses[i] == "applied" for i in trainers),
        }
        per_round.append(phases)
    for before, after in itertools.pairwise(per_round):  # rounds overlap: the next one may open first
        if before["all_applied_at"] is not None and after["all_applied_at"] is not None:
            after["period_s"] = after["all_applied_at"] - before["all_applied_at"]
    return {"roles": roles, "per_round": per_round}


def round_phases(events: list[Event], aggregator: int, trainers: list[int], opened: float) -> dict[str, Any]:
    """The phases of one round from its events: durations (medians over trainers) and the critical-path gaps."""

    def of(phase: str, node: int | None = None) -> list[Event]:
        return [e for e in events if e.phase == phase and (node is None or e.node == node)]

    applies = [e for e in of("apply") if e.node in trainers]
    sends = of("train_and_send")
    combined = of("combine", aggregator)
    agg = of("aggregate_round", aggregator)
    remote_fetch = [e for e in of("fetch") if e.node != aggregator]
    out: dict[str, Any] = {
        "member_start_s": {e.node: round(e.t0 - opened, 3) for e in sends},
        "wall_s": max(e.t1 for e in applies) - opened if applies else None,
        "all_applied_at": max(e.t1 for e in applies) if applies else None,
        "pre_open_s": opened - agg[0].t0 if agg else None,  # the aggregator loads the global and provides its CID
        "open_gossip_s": med([e.t0 - opened for e in of("notice_open") if e.node != aggregator]),
        "open_to_member_start_s": med([e.t0 - opened for e in sends if e.node != aggregator]),
        "train_stub_s": med([e.seconds for e in of("train")]),
        "release_s": med([e.seconds for e in of("release")]),
        "send_s": med([e.seconds for e in of("send")]),
        "train_and_send_s": med([e.seconds for e in sends]),
        "last_update_to_combine_s": combined[0].t0 - max(e.t1 for e in sends) if combined and sends else None,
        "combine_s": combined[0].seconds if combined else None,
        "combine_to_apply_start_s": med([e.t0 - combined[0].t1 for e in applies]) if combined else None,
        "combine_to_done_seen_s": med([e.t0 - combined[0].t1 for e in of("notice_done") if e.node != aggregator])
        if combined
        else None,
        "fetch_s": med([e.seconds for e in remote_fetch]),
        "ledger_s": med([e.seconds for e in of("ledger")]),
        "decode_s": med([e.seconds for e in of("decode") if e.node in trainers]),
        "install_s": med([e.seconds for e in of("install") if e.node in trainers]),
        "apply_s": med([e.seconds for e in applies]),
        "update_bytes": med([float(e.nbytes) for e in of("release")]),
        "aggregate_bytes": combined[0].nbytes if combined else None,
        "wire_bytes": sum(e.nbytes for e in of("send")) + sum(e.nbytes for e in remote_fetch),
        "sends": len(of("send")),
        "remote_fetches": len(remote_fetch),
    }
    if out["train_and_send_s"] is not None:
        parts = [out[k] or 0.0 for k in ("train_stub_s", "release_s", "send_s")]
        out["member_other_s"] = out["train_and_send_s"] - sum(parts)
    if out["apply_s"] is not None:
        parts = [out[k] or 0.0 for k in ("fetch_s", "decode_s", "install_s")]
        out["apply_other_s"] = out["apply_s"] - sum(parts)
    return out


def p2p_section(sizes: list[int], modes: list[str], rounds: int, warmup: int, tmp: Path, gguf: Path) -> dict[str, Any]:
    """Every (N, mode) configuration in turn, each in a fresh trio loop and folder."""
    runs: dict[str, Any] = {}
    for n in sizes:
        for mode in modes:
            key = f"N={n} {mode}"
            root = tmp / f"p2p-{n}-{mode.replace('+', '')}"
            t0, load0 = time.perf_counter(), load()
            print(f"p2p {key}: starting", file=sys.stderr)
            try:
                runs[key] = trio.run(federation_run, n, mode, rounds, warmup, root, gguf)
            except Exception as exc:  # one failed configuration must not lose the others
                print(f"p2p {key} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                runs[key] = {"nodes": n, "mode": mode, "error": f"{type(exc).__name__}: {exc}"}
            finally:
                shutil.rmtree(root, ignore_errors=True)
            runs[key] |= {"section_s": time.perf_counter() - t0, "load_before": load0, "load_after": load()}
            print(f"p2p {key}: done in {runs[key]['section_s']:.0f} s", file=sys.stderr)
    return runs


P2P_LINES = [
    # (key in round_phases, label, unit: "s" shown in ms except the wall and setup rows)
    ("wall_s", "round wall: RoundOpen → all applied", "s"),
    ("period_s", "round period: all applied → next all applied", "s"),
    ("pre_open_s", "aggregator before RoundOpen (global, provide)", "ms"),
    ("open_gossip_s", "RoundOpen gossip → reaches members", "ms"),
    ("open_to_member_start_s", "RoundOpen → member starts (ends prev. round)", "ms"),
    ("train_stub_s", "stub trainer (training excluded)", "ms"),
    ("release_s", "release: clip+noise+encode / encrypt", "ms"),
    ("send_s", "send update (stream + aggregator checks)", "ms"),
    ("member_other_s", "member other (HE ctx, ledger, sign, dial)", "ms"),
    ("ledger_s", "  of which privacy ledger (sqlite, worker thread)", "ms"),
    ("last_update_to_combine_s", "last update in → combine", "ms"),
    ("combine_s", "combine (fedavg / blind CKKS sum)", "ms"),
    ("combine_to_done_seen_s", "combine → RoundDone reaches members", "ms"),
    ("combine_to_apply_start_s", "combine → members start applying", "ms"),
    ("fetch_s", "fetch aggregate by CID (remote members)", "ms"),
    ("decode_s", "decode / decrypt aggregate", "ms"),
    ("install_s", "install_global (GGUF write + install)", "ms"),
    ("apply_other_s", "apply other (apply, store global, db)", "ms"),
    ("update_bytes", "update per client", "kB"),
    ("aggregate_bytes", "aggregate", "kB"),
    ("wire_bytes", "payload bytes on the wire per round", "kB"),
]


def p2p_table(runs: dict[str, Any]) -> list[Row]:
    """One row per phase, one column per configuration: medians over the rounds after the warm-up ones."""
    keys = [k for k, v in runs.items() if "per_round" in v]
    rows: list[Row] = []
    for name, label, unit in P2P_LINES:
        row: Row = {"what": label, "unit": unit}
        for key in keys:
            values = [p[name] for p in runs[key]["per_round"][runs[key]["warmup"] :] if p.get(name) is not None]
            value = med([float(v) for v in values])
            if value is not None and unit == "ms":
                value *= 1000
            elif value is not None and unit == "kB":
                value /= KB
            row[key] = value
        rows.append(row)
    for key in keys:  # ratios against the plaintext (dp) run of the same size
        n = runs[key]["nodes"]
        reference = runs.get(f"N={n} dp", {})
        if "per_round" not in reference:
            continue
        for row in rows:
            if row["what"].startswith(("round wall", "round period", "update per client")) and row.get(key):
                row.setdefault("ratios", {})[key] = row[key] / row[f"N={n} dp"] if row.get(f"N={n} dp") else None
    return rows


def p2p_ok(run: dict[str, Any]) -> bool:
    """Whether every measured round was applied by all trainers with every trainer's update."""
    return all(p["applied_everywhere"] and p["contributors"] == run["trainers"] for p in run["per_round"])


def print_p2p_table(runs: dict[str, Any], rows: list[Row]) -> None:
    """The phase table, and the per-configuration facts under it."""
    keys = [k for k, v in runs.items() if "per_round" in v]
    print("\nP2P rounds without training (medians over rounds; phases: median over trainers)")
    print(f"{'what':46} {'unit':4} " + " ".join(f"{k:>11}" for k in keys))
    for row in rows:
        cells = []
        for key in keys:
            v = row.get(key)
            cells.append(
                f"{v:11.2f}"
                if isinstance(v, float) and row["unit"] == "s"
                else f"{v:11.0f}"
                if v is not None
                else f"{'-':>11}"
            )
        print(f"{row['what']:46} {row['unit']:4} " + " ".join(cells))
        if "ratios" in row:
            cells = [f"{row['ratios'].get(k):10.2f}x" if row["ratios"].get(k) else f"{'':11}" for k in keys]
            print(f"{'  × the dp run of the same N (a separate run)':46} {'':4} " + " ".join(cells))
    for key, run in runs.items():
        if "error" in run:
            print(f"{key}: FAILED {run['error']}")
            continue
        walls = " ".join("-" if p["wall_s"] is None else f"{p['wall_s']:.2f}" for p in run["per_round"])
        walls += f" (the first {run['warmup']} are warm-up)" if run["warmup"] else ""
        ok = p2p_ok(run)
        aggs = ",".join(str(p["aggregator"]) for p in run["per_round"])
        print(
            f"{key}: setup {run['setup_s']:.1f} s (converge {run['converge_s']:.1f} s); rounds {walls} s; "
            f"aggregators {aggs}; every round applied by all {run['trainers']} trainers with all updates: {ok}"
        )


# --- he section ---------------------------------------------------------------------------------------------------


def bench_descriptor(mode: str, quorum: int, base_sha256: str) -> FederationDescriptor:
    """A signed descriptor of a `mode` federation with the bench's adapter and DP settings."""
    data = sign_descriptor(
        Identity.generate(),
        name=f"he-bench-{mode.replace('+', '-')}",
        base_sha256=base_sha256,
        adapter=AdapterConfig(rank=RANK, alpha=ALPHA, targets=TARGETS),
        privacy=Privacy(
            mode=mode,  # type: ignore[arg-type]
            dp=DpParams(clip_norm=CLIP_NORM, noise_multiplier=NOISE if mode != "he" else 0.0, delta=1e-5),
            he=HeParams() if "he" in mode else None,
        ),
        quorum=quorum,
        min_members=quorum,
        round_deadline_s=DEADLINE_S,
        local_steps=1,
        epsilon_budget=1e5,
    )
    return verify_descriptor(data)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def he_section(gguf: Path, counts: list[int], reps: int, seed: int) -> dict[str, Any]:
    """Per-client HE costs of one real-size update and aggregation of N updates, against the plaintext path."""
    from node.training.base_model import file_digest

    tensors = initial_adapter(gguf, RANK, ALPHA, TARGETS, seed=f"bench-{seed}")
    layout = Layout.of(tensors)
    digest = file_digest(gguf)
    quorum = max(counts)
    # the update-level mechanisms (clip, noise, noise share) are what release() itself costs: the -user modes
    desc = {mode: bench_descriptor(f"{mode}-user" if "dp" in mode else mode, quorum, digest) for mode in MODES}
    secret = SecretContext.generate(HEParams())
    public = secret.public()
    deltas = [stub_trainer(i)(desc["dp"], tensors, 1, None, None).tensors for i in range(quorum)]
    deltas = [{k: (d[k] - tensors[k]).astype(np.float32) for k in tensors} for d in deltas]
    vectors = [flatten(d, layout) for d in deltas]
    print(f"he: {layout.size} values; encrypting {quorum} updates for the aggregation inputs", file=sys.stderr)
    plain_payloads = [encode_tensors(unflatten(v, layout)) for v in vectors]
    ckks_payloads = [encrypt_vector(public, v).serialize() for v in vectors]
    seconds: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        seconds.setdefault(name, []).append(value)

    v0, d0 = vectors[0], deltas[0]
    last = counts[-1]
    plain_updates = {n: [(f"m{i}", plain_payloads[i]) for i in range(n)] for n in counts}
    ckks_updates = {n: [(f"m{i}", ckks_payloads[i]) for i in range(n)] for n in counts}
    plain_mean = combine(plain_updates[last], layout, desc["dp"]).payload
    ckks_sum = combine(ckks_updates[last], layout, desc["he"], public).payload
    for rep in range(reps):
        # client side: plaintext reference, then CKKS, on the same vector
        t, plain = timed(functools.partial(lambda v: encode_tensors(unflatten(v, layout)), v0))
        add("plain_serialize", t)
        t, enc = timed(functools.partial(encrypt_vector, public, v0))
        add("he_encrypt", t)
        t, cipher = timed(enc.serialize)
        add("he_serialize", t)
        add("release_dp", timed(functools.partial(release, d0, layout, desc["dp"]))[0])
        add("release_he", timed(functools.partial(release, d0, layout, desc["he"], public))[0])
        add("release_hedp", timed(functools.partial(release, d0, layout, desc["he+dp"], public))[0])
        # aggregator side: parse one update
        add("plain_parse", timed(functools.partial(decode_tensors, plain, layout, MAX_PLAIN_BYTES))[0])
        add("he_parse", timed(functools.partial(EncryptedVector.deserialize, public, cipher))[0])
        # aggregation of N updates
        for n in counts:
            stacked = vectors[:n]
            add(f"numpy_mean_{n}", timed(functools.partial(lambda vs: np.mean(np.stack(vs), axis=0), stacked))[0])
            add(f"plain_combine_{n}", timed(functools.partial(combine, plain_updates[n], layout, desc["dp"]))[0])
            encs = [EncryptedVector.deserialize(public, c) for c in ckks_payloads[:n]]
            add(f"he_add_{n}", timed(functools.partial(add_encrypted, encs))[0])
            add(f"he_combine_{n}", timed(functools.partial(combine, ckks_updates[n], layout, desc["he"], public))[0])
        # member side: the aggregate of the largest N back to tensors
        total = EncryptedVector.deserialize(secret, ckks_sum)
        add("he_decrypt", timed(functools.partial(decrypt_vector, secret, total))[0])
        add("plain_mean_update", timed(functools.partial(mean_update, "plain", plain_mean, last, layout))[0])
        add("he_mean_update", timed(functools.partial(mean_update, "ckks", ckks_sum, last, layout, secret))[0])
        print(f"he rep {rep + 1}/{reps} done", file=sys.stderr)
    return {
        "values": layout.size,
        "counts": counts,
        "reps": reps,
        "plain_bytes": len(plain_payloads[0]),
        "ckks_bytes": len(ckks_payloads[0]),
        "ckks_chunks": -(-layout.size // HEParams().slots),
        "he_public_context_bytes": len(public.public_bytes()),
        "seconds": seconds,
    }


def he_rows(result: dict[str, Any]) -> list[Row]:
    """Table rows: median ms, and the median of per-repetition ratios against the plaintext reference."""
    s = result["seconds"]

    def ratio(name: str, reference: str) -> float:
        return statistics.median(a / b for a, b in zip(s[name], s[reference], strict=True))

    def summed_ratio(names: list[str], reference: str) -> float:
        totals = [sum(parts) for parts in zip(*(s[n] for n in names), strict=True)]
        return statistics.median(a / b for a, b in zip(totals, s[reference], strict=True))

    def row(what: str, name: str, reference: str | None, note: str = "") -> Row:
        return {
            "what": what,
            "ms": statistics.median(s[name]) * 1000,
            "ratio": ratio(name, reference) if reference else None,
            "reference": reference or "",
            "notes": note,
        }

    rows = [
        row("plaintext serialize (safetensors) — reference", "plain_serialize", None),
        row("CKKS encrypt", "he_encrypt", "plain_serialize", f"{result['ckks_chunks']} ciphertexts"),
        row("CKKS serialize", "he_serialize", "plain_serialize"),
        {
            "what": "CKKS encrypt + serialize",
            "ms": statistics.median(a + b for a, b in zip(s["he_encrypt"], s["he_serialize"], strict=True)) * 1000,
            "ratio": summed_ratio(["he_encrypt", "he_serialize"], "plain_serialize"),
            "reference": "plain_serialize",
            "notes": "",
        },
        row("release() dp: clip + noise + safetensors", "release_dp", "plain_serialize"),
        row("release() he: clip + encrypt + serialize", "release_he", "release_dp", "ratio vs release() dp"),
        row("release() he+dp: clip + noise share + encrypt", "release_hedp", "release_dp", "ratio vs release() dp"),
        {
            "what": "bytes per client update",
            "ms": None,
            "ratio": result["ckks_bytes"] / result["plain_bytes"],
            "reference": "plain bytes",
            "notes": f"plaintext {result['plain_bytes'] / KB:.0f} kB, CKKS {result['ckks_bytes'] / KB:.0f} kB",
        },
        row("aggregator parse: decode_tensors — reference", "plain_parse", None),
        row("aggregator parse: CKKS deserialize + checks", "he_parse", "plain_parse"),
    ]
    for n in result["counts"]:
        rows += [
            row(f"numpy mean of {n} updates — reference", f"numpy_mean_{n}", None),
            row(f"plain combine of {n} (decode, fedavg, encode)", f"plain_combine_{n}", f"numpy_mean_{n}"),
            row(f"CKKS add_encrypted of {n} (blind sum)", f"he_add_{n}", f"numpy_mean_{n}"),
            row(f"CKKS combine of {n} (parse, sum, serialize)", f"he_combine_{n}", f"numpy_mean_{n}"),
        ]
    n = result["counts"][-1]
    rows += [
        row(f"member: mean_update plain (decode), N={n} — reference", "plain_mean_update", None),
        row("member: CKKS decrypt_vector of the sum", "he_decrypt", "plain_mean_update"),
        row("member: mean_update CKKS (parse, decrypt, /N)", "he_mean_update", "plain_mean_update"),
    ]
    return rows


def print_he_table(rows: list[Row]) -> None:
    """The HE-vs-plaintext table."""
    print("\nHE vs plaintext, one client's update (medians; ratio = median of per-repetition ratios)")
    print(f"{'what':54} {'ms':>9} {'ratio':>9}  notes")
    for r in rows:
        ms = f"{r['ms']:9.2f}" if r["ms"] is not None else f"{'':9}"
        ratio = f"{r['ratio']:8.1f}x" if r["ratio"] is not None else f"{'':9}"
        print(f"{r['what']:54} {ms} {ratio}  {r['notes']}")


# --- flower section -----------------------------------------------------------------------------------------------


def write_topic_data(path: Path, index: int, count: int = 16) -> Path:
    """`count` short generated sentences (one example each) for one SuperNode."""
    words = ["hive", "queen", "honey", "comb", "mast", "keel", "jib", "dough", "yeast", "orbit", "comet", "moon"]
    lines = [f"The {words[(index + i) % 12]} and the {words[(3 * i + index) % 12]} are near." for i in range(count)]
    path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    return path


def flower_run(
    n: int, mode: str, rounds: int, tmp: Path, base: Path, init_weights: Path, timeout: float
) -> dict[str, Any]:
    """A SuperLink and `n` SuperNodes run the Flower app for `rounds` rounds; the ServerApp's summary and timings."""
    from node.fed.flower.cli import Connection, run_app, run_logs, wait_run
    from node.fed.flower.engine import FlowerDeployment
    from node.fed.flower.processes import FlowerEngineError

    work = tmp / f"flower-{n}-{mode}"
    work.mkdir(parents=True)
    data = [write_topic_data(work / f"data-{i}.txt", i) for i in range(n)]
    out = work / "result"
    run_config: dict[str, str | int | float | bool] = {
        "num-rounds": rounds,
        "min-nodes": n,
        "local-steps": 1,
        "rank": RANK,
        "alpha": ALPHA,
        "targets": "qv",
        "batch-size": 1,
        "max-length": 16,
        "threads": 1,
        "clip-norm": CLIP_NORM,
        "noise-multiplier": NOISE if mode == "dp" else 0.0,
        "round-timeout": 600.0,
        "node-wait": 120.0,
        "base": str(base),
        "init-adapter": str(init_weights),
        "out": str(out),
    }
    dep = FlowerDeployment(work / "flower")
    status, run_id, conn = "not started", None, None
    result: dict[str, Any] = {"nodes": n, "mode": mode, "rounds_wanted": rounds}
    t0 = time.perf_counter()
    try:
        link = dep.superlink()
        assert link.address is not None
        conn = Connection(link.address)
        for path in data:
            dep.supernode(
                link.address, {"data": str(path), "base": str(base), "report-timings": True}, max_wait_time=120.0
            )
        result["start_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        run_id = run_app(conn, run_config)
        status = wait_run(conn, run_id, timeout=timeout, poll=1.0, processes=dep.processes)
        result["run_s"] = time.perf_counter() - t1
    finally:
        if status != "finished:completed" and conn is not None and run_id is not None:
            with contextlib.suppress(FlowerEngineError):
                print(run_logs(conn, run_id)[-4000:], file=sys.stderr)
        dep.stop(timeout=10.0)
        if status != "finished:completed":
            print(dep.logs()[-6000:], file=sys.stderr)
    result["status"] = status
    if status != "finished:completed":
        result["error"] = f"the Flower run ended {status}"
    else:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        result["per_round"] = [
            {
                "round": r["round"],
                "seconds": r["seconds"],
                "members": len(r["members"]),
                "failures": r["failures"],
                "train_seconds": sorted(float(m["train-seconds"]) for m in r["metrics"].values()),
            }
            for r in summary["rounds"]
        ]
        result["params"] = summary["params"]
        if empty := [r["round"] for r in result["per_round"] if not r["train_seconds"]]:
            result["error"] = f"rounds {empty} reported no member's training time"
            del result["per_round"]
    return result


def flower_section(sizes: list[int], modes: list[str], rounds: int, tmp: Path, gguf: Path, seed: int) -> dict[str, Any]:
    """The torch twin of the embedded model once, the round-1 adapter as a peft folder, then each (N, mode) run."""
    from node.training.base_model import ensure_torch_base

    t0 = time.perf_counter()
    base = ensure_torch_base(tmp / "models", gguf)
    init = tmp / "flower-init"
    init.mkdir()
    import safetensors.numpy

    tensors = initial_adapter(gguf, RANK, ALPHA, TARGETS, seed=f"bench-{seed}")
    safetensors.numpy.save_file(tensors, str(init / "adapter_model.safetensors"))
    (init / "adapter_config.json").write_text(json.dumps(peft_config(RANK, ALPHA, TARGETS)), encoding="utf-8")
    runs: dict[str, Any] = {"torch_base_s": time.perf_counter() - t0}
    for n in sizes:
        for mode in modes:
            key = f"N={n} {mode}"
            t1, load0 = time.perf_counter(), load()
            print(f"flower {key}: starting", file=sys.stderr)
            try:
                runs[key] = flower_run(n, mode, rounds, tmp, base, init / "adapter_model.safetensors", 900.0)
            except Exception as exc:
                print(f"flower {key} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                runs[key] = {"nodes": n, "mode": mode, "error": f"{type(exc).__name__}: {exc}"}
            runs[key] |= {"section_s": time.perf_counter() - t1, "load_before": load0, "load_after": load()}
            print(f"flower {key}: done in {runs[key]['section_s']:.0f} s", file=sys.stderr)
    return runs


def flower_rows(runs: dict[str, Any]) -> list[Row]:
    """One row per configuration: round time, slowest member's training, the difference, all medians over rounds."""
    rows = []
    for key, run in runs.items():
        if not isinstance(run, dict) or "per_round" not in run:
            continue
        per = run["per_round"]
        rows.append(
            {
                "config": key,
                "round_s": statistics.median(r["seconds"] for r in per),
                "train_max_s": statistics.median(max(r["train_seconds"]) for r in per),
                "train_median_s": statistics.median(statistics.median(r["train_seconds"]) for r in per),
                "overhead_s": statistics.median(r["seconds"] - max(r["train_seconds"]) for r in per),
                "rounds": " ".join(f"{r['seconds']:.1f}" for r in per),
                "members": min(r["members"] for r in per),
                "start_s": run["start_s"],
                "run_s": run["run_s"],
            }
        )
    return rows


def print_flower_table(runs: dict[str, Any], rows: list[Row]) -> None:
    """The Flower table."""
    print("\nFlower deployment engine (SuperLink + SuperNodes, medians over rounds)")
    print(f"{'config':12} {'round s':>8} {'train max':>9} {'train med':>9} {'round-train':>11}  notes")
    for r in rows:
        print(
            f"{r['config']:12} {r['round_s']:8.2f} {r['train_max_s']:9.2f} {r['train_median_s']:9.2f} "
            f"{r['overhead_s']:11.2f}  rounds {r['rounds']} s; {r['members']} members; start {r['start_s']:.1f} s, "
            f"flwr run → finished {r['run_s']:.1f} s"
        )
    for key, run in runs.items():
        if isinstance(run, dict) and "error" in run:
            print(f"{key}: FAILED {run['error']}")


def code_state() -> dict[str, Any]:
    """The commit, the uncommitted files and the sha256 of the federation code this run imported."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        return done.stdout.strip()

    files = ["node/fed/service.py", "node/fed/node.py", "node/fed/adapter.py", "federation/privacy.py", "crypto/he.py"]
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted": git("status", "--short", "--untracked-files=no").splitlines(),
        "sha256": {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:16] for f in files},
    }


# --- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    """Run the benchmark and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 nodes, 1 round, 2 reps, Flower 2 nodes 1 round")
    ap.add_argument("--nodes", type=positive_int, nargs="+", default=None, help="P2P network sizes (default 4 8)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="P2P privacy modes")
    ap.add_argument("--rounds", type=positive_int, default=None, help="P2P rounds per run (default 3; quick 1)")
    ap.add_argument("--warmup", type=non_negative_int, default=None, help="P2P rounds before the measured (default 1)")
    ap.add_argument("--reps", type=positive_int, default=None, help="HE section repetitions (default 5; quick 2)")
    ap.add_argument("--no-p2p", action="store_true", help="skip the P2P rounds")
    ap.add_argument("--no-he", action="store_true", help="skip the per-client HE section")
    ap.add_argument("--no-flower", action="store_true", help="skip Flower's deployment engine")
    ap.add_argument("--flower-nodes", type=positive_int, nargs="+", default=None, help="SuperNodes (4 8; quick 2)")
    ap.add_argument("--flower-modes", nargs="+", choices=["dp", "plain"], default=["dp"])
    ap.add_argument("--flower-rounds", type=positive_int, default=None, help="Flower rounds (default: --rounds)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "federation.json")
    args = ap.parse_args()
    for option in ("nodes", "modes", "flower_nodes", "flower_modes"):
        values = getattr(args, option)
        if values is not None and len(set(values)) != len(values):
            ap.error(f"--{option.replace('_', '-')} repeats a value: {' '.join(map(str, values))}")
    if args.nodes and not args.no_p2p and min(args.nodes) < 2:
        ap.error("--nodes: a federation needs at least 2 nodes (3 under he, where one only aggregates)")
    sizes = args.nodes or ([4] if args.quick else [4, 8])
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    reps = args.reps or (2 if args.quick else 5)
    flower_sizes = args.flower_nodes or ([2] if args.quick else [4, 8])
    flower_rounds = args.flower_rounds or rounds

    counter = LogCounter()
    for name in ("libp2p", "node", "marketplace", "federation", "crypto"):
        logger = logging.getLogger(name)
        logger.addHandler(counter)
        logger.propagate = False
        logger.setLevel(logging.WARNING)

    gguf = embedded_model_path()
    result: dict[str, Any] = run_header("libp2p", "tenseal", "flwr") | {
        "model": gguf.name,
        "adapter": {"rank": RANK, "alpha": ALPHA, "targets": list(TARGETS)},
        "seed": args.seed,
        "code": code_state(),
        "sections": {},
    }
    t_start = time.perf_counter()
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-federation-") as tmp_name:
        tmp = Path(tmp_name)
        sections: list[tuple[str, Callable[[], Any]]] = []
        if not args.no_p2p:
            sections.append(("p2p", functools.partial(p2p_section, sizes, args.modes, rounds, warmup, tmp, gguf)))
        if not args.no_he:
            sections.append(("he", functools.partial(he_section, gguf, sizes, reps, args.seed)))
        if not args.no_flower:
            flower = functools.partial(
                flower_section, flower_sizes, args.flower_modes, flower_rounds, tmp, gguf, args.seed
            )
            sections.append(("flower", flower))
        for name, run in sections:
            t0, load0 = time.perf_counter(), load()
            try:
                section = run()
            except Exception as exc:  # one broken section must not lose the others' results
                print(f"section {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                section = {"error": f"{type(exc).__name__}: {exc}"}
                failed.append(name)
            section |= {"load_before": load0, "load_after": load(), "section_s": time.perf_counter() - t0}
            result["sections"][name] = section
            print(f"section {name} done in {section['section_s']:.0f} s", file=sys.stderr)

    write_json(args.out, result)  # the raw results are kept whatever the tables below do
    sections_out = result["sections"]
    if "p2p" in sections_out and "error" not in sections_out["p2p"]:
        runs = {k: v for k, v in sections_out["p2p"].items() if isinstance(v, dict)}
        rows = p2p_table(runs)
        result["p2p_rows"] = rows
        print_p2p_table(runs, rows)
        failed += [f"p2p {k}" for k, v in runs.items() if "error" in v or not p2p_ok(v)]
    if "he" in sections_out and "error" not in sections_out["he"]:
        rows = he_rows(sections_out["he"])
        result["he_rows"] = rows
        print_he_table(rows)
    if "flower" in sections_out and "error" not in sections_out["flower"]:
        runs = sections_out["flower"]
        rows = flower_rows(runs)
        result["flower_rows"] = rows
        print_flower_table(runs, rows)
        failed += [f"flower {k}" for k, v in runs.items() if isinstance(v, dict) and "error" in v]
    result |= {"load_after": load(), "total_s": time.perf_counter() - t_start, "warnings_in_process": counter.top()}
    for text, count in counter.top(8).items():
        print(f"warning x{count}: {text}")
    write_json(args.out, result)
    print(
        f"py-libp2p {result['libp2p']}, TenSEAL {result['tenseal']}, flwr {result['flwr']}, {result['cpu_count']} "
        f"CPUs, load {result['load_before']} before, {result['load_after']} after; {result['total_s']:.0f} s; "
        f"wrote {args.out}"
    )
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
