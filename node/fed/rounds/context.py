"""What both round roles share: this node's collaborators, the federation's inboxes, its global adapter, the rounds
table, and scratch space."""

import logging
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crypto.identity import Identity
from federation.descriptor import FederationDescriptor
from federation.messages import RoundDone
from federation.update import Layout, decode_tensors, encode_tensors
from marketplace.content_store import EmbeddedStore
from node.fed.membership import Membership
from node.fed.rounds.events import RoundEvents
from node.fed.rounds.inbox import Inbox
from node.fed.store import RoundStatus
from node.market.network_store import NetworkStore
from node.market.registry_dht import DhtRegistry
from node.p2p.host import P2PNode

log = logging.getLogger(__name__)
SCRATCH_PREFIX = ".fed-scratch-"
MAX_GLOBAL_BYTES = 256 * 1024 * 1024

InstallGlobal = Callable[[FederationDescriptor, Mapping[str, np.ndarray]], str]
InitialGlobal = Callable[[FederationDescriptor], dict[str, np.ndarray]]
# train and install this member's personal adapter over a new global (blocking; None: none wanted), its status
Personalize = Callable[[FederationDescriptor, Mapping[str, np.ndarray], int, threading.Event], dict[str, Any] | None]


@dataclass
class RoundContext:
    """This node's side of every federation's rounds: collaborators and shared state (built by the service)."""

    root: Path
    identity: Identity
    p2p: P2PNode
    registry: DhtRegistry
    local: EmbeddedStore
    state: Any  # node.fed.store.FederationStore
    membership: Membership
    install_global: InstallGlobal
    initial_global: InitialGlobal
    gossip: Callable[[str, str, bytes], None]
    dial: Callable[[Any], Awaitable[None]]
    spawn: Callable[..., None]  # start a background task in the service's nursery
    personalize: Personalize | None = None
    events: RoundEvents = field(default_factory=RoundEvents)
    inboxes: dict[str, Inbox] = field(default_factory=dict)
    status_of: dict[str, dict[str, Any]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def inbox(self, fid: str) -> Inbox:
        """The round notices of federation `fid` (created on first use)."""
        return self.inboxes.setdefault(fid, Inbox())

    def scratch(self) -> "tempfile.TemporaryDirectory[str]":
        """A scratch folder in the node's home (removed after use; by the next start if the node was killed)."""
        return tempfile.TemporaryDirectory(dir=self.root, prefix=SCRATCH_PREFIX)

    def network_store(self) -> NetworkStore:
        """The content store that fetches missing blocks from the DHT's providers (every block verified), over the
        libp2p block protocol: a round's aggregate is an adapter of a few MB, and the bulk channel is the market's
        (it follows `[p2p] bulk`)."""
        return NetworkStore(self.local, self.p2p, self.registry, bulk=False)

    def global_of(self, descriptor: FederationDescriptor) -> tuple[dict[str, np.ndarray], str]:
        """The current global adapter tensors and their CID (round 0: the deterministic initial adapter)."""
        row = self.state.federation(descriptor.federation_id)
        if row is not None and row.global_cid:
            data = b"".join(self.local.cat(row.global_cid))
            tensors = decode_tensors(data, Layout.of(self.initial_global(descriptor)), MAX_GLOBAL_BYTES)
            return tensors, row.global_cid
        tensors = self.initial_global(descriptor)
        return tensors, self.store_tensors(tensors)

    def store_tensors(self, tensors: Mapping[str, np.ndarray]) -> str:
        """Add tensors (safetensors) to the local store; their CID."""
        return self.store_bytes(encode_tensors(dict(tensors)), "adapter.safetensors")

    def store_bytes(self, data: bytes, name: str = "aggregate.bin") -> str:
        """Add bytes to the local store; their CID."""
        with self.scratch() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            return self.local.add(path).cid

    def finish(self, fid: str, done: RoundDone, status: RoundStatus) -> None:
        """Record the round `done` announced, as `status` ('aggregated' where the aggregate cannot be applied)."""
        self.state.finish_round(
            fid,
            done.round,
            status,
            aggregate_cid=done.aggregate_cid,
            contributors=list(done.contributors),
            aggregator=done.aggregator,
        )

    def abandon(self, fid: str, r: int, reason: str) -> None:
        """Record round r as abandoned on this node (unless it was finished meanwhile)."""
        last = self.state.last_round(fid)
        if last is not None and last.round == r and last.status in ("applied", "aggregated"):
            return
        try:
            self.state.finish_round(fid, r, "abandoned", reason=reason[:1000])
        except ValueError as exc:
            log.info("round %d: %s", r, exc)


def describe(exc: BaseException) -> str:
    """One line for an error, looking inside exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
