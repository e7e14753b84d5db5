"""What a running node holds, shared by the daemon, the HTTP API and (later) the P2P layer."""

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from crypto.identity import Identity
from node import __version__
from node.adapters.cache import AdapterRef
from node.adapters.store import AdapterStore
from node.agents.events import EventBus
from node.core.config import NodeConfig
from node.core.home import NodeHome
from node.inference.engine import InferenceEngine
from node.inference.extra_buffers import Verdict
from node.inference.models import BaseModel
from node.market.notices import ArtifactPublished
from node.p2p.host import P2PNode
from node.p2p.notices import NoticeBoard
from node.training.feedback import FeedbackDB

if TYPE_CHECKING:
    from node.agents.service import AgentService
    from node.fed.node import FederationNode
    from node.market.service import MarketService
    from node.memory.service import MemoryService
    from node.tools.service import ToolService
from node.adapters.personalities import ManifestFile, Route, route
from node.core.profiles import InferenceSettings
from node.training.service import TrainingService


@dataclass
class NodeState:
    """The running node's parts."""

    config: NodeConfig
    settings: InferenceSettings
    home: NodeHome
    identity: Identity
    model: BaseModel
    engine: InferenceEngine
    adapters: AdapterStore
    manifest: ManifestFile
    feedback: FeedbackDB
    training: TrainingService
    p2p: P2PNode | None = None
    notices: NoticeBoard | None = None
    market: "MarketService | None" = None
    federations: "FederationNode | None" = None
    memory: "MemoryService | None" = None
    tools: "ToolService | None" = None
    agents: "AgentService | None" = None
    events: EventBus = field(default_factory=EventBus)
    extra_buffers: Verdict | None = None
    api_token: str = ""  # the per-home token of state-changing routes (node.core.api_token)
    started_at: float = field(default_factory=time.time)
    shutting_down: bool = False

    def resolve(self, model: str, latest_user_message: str | None) -> tuple[Route, tuple[AdapterRef, ...]]:
        """Who answers (see node.adapters.personalities) and the current version of each of its adapters.

        Raises UnknownModelError or UnknownAdapterError.
        """
        chosen = route(model, latest_user_message, self.manifest.personalities(), self.model.names())
        refs = []
        for name, scale in chosen.adapters:
            version = self.adapters.current(name)
            refs.append(AdapterRef(version.key, version.gguf, scale))
        return chosen, tuple(refs)

    def p2p_status(self) -> dict[str, Any]:
        """The libp2p side: peer id, listen addresses, connected peers."""
        if self.p2p is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "peer_id": str(self.p2p.peer_id),
            "listen_addrs": [str(a) for a in self.p2p.listen_addrs],
            "peers": sorted(str(p) for p in self.p2p.peers()),
            "known_peers": sorted(str(p) for p in self.p2p.known_peers()),
            "dht": self.p2p.dht_stats(),
            "stream_refusals": dict(self.p2p.stream_refusals),
            "market": self.market.status() if self.market is not None else {"enabled": False},
            "notices": self.notices_status(),
        }

    def federations_status(self) -> list[dict[str, Any]]:
        """Each federation's phase, round and privacy spent (as of its last release; cheap: no accounting here)."""
        if self.federations is None:
            return []
        out = []
        for row in self.federations.state.federations(active_only=False):
            live = self.federations.service.status_of.get(row.id, {})
            out.append(
                {
                    "name": row.name,
                    "federation_id": row.id,
                    "mode": row.descriptor.privacy.mode,
                    "active": row.left_at is None,
                    "global_round": row.global_round,
                    "epsilon_budget": row.descriptor.epsilon_budget,
                }
                | live
            )
        return out

    def notices_status(self) -> dict[str, Any]:
        """Gossip notices: counters, peers scored down or blacklisted, the last artifacts announced."""
        if self.notices is None:
            return {}
        stats = self.notices.stats()
        return {
            "accepted": stats.accepted,
            "refused": stats.refused,
            "published": stats.published,
            "scores": {peer: score for peer, score in self.notices.scores().items() if score < 0},
            "blacklisted": self.notices.blacklisted(),
            "recent_artifacts": [
                {"origin": r.origin, "received_at": r.received_at} | msgspec.to_builtins(r.notice)
                for r in self.notices.recent(ArtifactPublished)[-10:]
            ],
        }

    def _extra_buffers_status(self) -> dict[str, Any]:
        """Why llama.cpp's extra buffer types are on or off (the probe's verdict)."""
        v = self.extra_buffers
        return {} if v is None else {"extra_buffers_choice": {"source": v.source, "reason": v.reason} | v.facts}

    def status(self) -> dict[str, Any]:
        """The node's status as a JSON-ready dict (served at /v1/node/status, shown by `mirador node status`)."""
        engine = self.engine
        return {
            "node": {
                "version": __version__,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started_at, 1),
                "home": str(self.home.root),
                "identity": self.identity.fingerprint,
                "shutting_down": self.shutting_down,
            },
            "profile": {
                "name": self.settings.profile,
                "threads": self.settings.threads,
                "n_ctx": self.settings.n_ctx,
                "max_tokens": self.settings.max_tokens,
                "batch_size": self.settings.batch_size,
                "slots": self.settings.slots,
                "adapter_cache_mb": self.settings.adapter_cache_mb,
            },
            "model": self.model.describe() | self._extra_buffers_status(),
            "engine": {
                "slots": engine.slots,
                "active": engine.active,
                "waiting": engine.waiting,
                "completed": engine.completed,
                "stopped": engine.stopped,
            },
            "personalities": {
                "manifest": str(self.manifest.path),
                "names": [p.name for p in self.manifest.personalities()],
                "error": self.manifest.error,
            },
            "adapters": {"installed": self.adapters.names(), "cache": engine.adapters.stats()},
            "training": self.training.status(),
            "p2p": self.p2p_status(),
            "federations": self.federations_status(),
            "api": {
                "host": self.config.api.host,
                "port": self.config.api.port,
                "auth": bool(self.config.api.token),
                "changes_need_token": bool(self.config.api.token or (self.config.api.home_token and self.api_token)),
                "allowed_origins": list(self.config.api.allowed_origins),
            },
        }
