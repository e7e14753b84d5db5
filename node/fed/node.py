"""The daemon's federations: the FederationService built with this node's model, trainer, adapter store and ledger,
plus what the API and CLI ask of it (create, join, leave, status, rounds)."""

import json
import logging
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import trio

from crypto.dp import Spend, epsilon
from crypto.he import HEParams, SecretContext
from crypto.identity import Identity
from crypto.sealing import x25519_public_of
from federation.descriptor import (
    AdapterConfig,
    DpParams,
    FederationDescriptor,
    HeParams,
    LocalDpSgd,
    Privacy,
    StrategySpec,
    sign_admission,
    sign_descriptor,
    sign_join,
    verify_admission,
    verify_descriptor,
)
from federation.ledger import DatasetBudget, PrivacyLedger
from federation.policy import PrivacyPolicy, check_descriptor
from federation.privacy import LORA_A_SUFFIX, check_user_level, round_spend, unit_of_privacy, update_kind
from federation.update import Layout
from node.adapters.store import AdapterStore
from node.core.fsutil import atomic_write_text
from node.core.home import NodeHome
from node.fed import wire as fed_wire
from node.fed.adapter import (
    LocalResult,
    RoundDpSgd,
    adapter_shapes,
    base_dims,
    initial_adapter,
    install_global,
    load_peft_tensors,
    round_sample_rate,
    sweep_local_runs,
    train_locally,
)
from node.fed.dht import DhtFederations
from node.fed.errors import FederationError
from node.fed.rounds.member import Account, Trained, Trainer
from node.fed.service import FederationService
from node.fed.store import FederationStore
from node.market.registry_dht import DhtRegistry
from node.p2p.host import P2PNode
from node.p2p.notices import NoticeBoard
from node.training.base_model import file_digest
from node.training.trainer import PERSONAL_ANCHOR_SAMPLES, PERSONAL_ANCHOR_WEIGHT

log = logging.getLogger(__name__)
SETTINGS_FILE = "member.json"
PERSONAL_ONLY = ("anchor_samples", "anchor_weight")  # train options of the personal adapter alone


class FederationNode:
    """This node's federations: the round service and the commands around it."""

    def __init__(
        self,
        home: NodeHome,
        identity: Identity,
        gguf: Path,
        adapters: AdapterStore,
        p2p: P2PNode,
        notices: NoticeBoard,
        registry: DhtRegistry,
        local: Any,  # marketplace.content_store.EmbeddedStore
        keep_released: bool = False,
        trainer: Trainer | None = None,
        policy: PrivacyPolicy | None = None,
    ) -> None:
        """`trainer` replaces local training through the training subprocess (bench/federation.py's stub);
        `policy` is this node's [privacy] (defaults otherwise)."""
        if p2p.dht is None:
            raise FederationError("federations need the DHT")
        self.home, self.identity, self.gguf, self.adapters = home, identity, gguf, adapters
        self.state = FederationStore.for_home(home)
        self.dht = DhtFederations(p2p.dht)
        self.ledger_path = home.state_db
        self.policy = policy or PrivacyPolicy()
        self._initial: dict[str, dict[str, np.ndarray]] = {}
        if swept := sweep_local_runs(home):
            log.info("removed %d federation training folder(s) left by a previous run", swept)
        self.service = FederationService(
            home.root,
            identity,
            p2p,
            notices,
            registry,
            local,
            self.state,
            self.ledger_path,
            trainer or self._train,
            self._install,
            self._initial_global,
            keep_released,
            self.policy,
            personalize=self._personalize if trainer is None else None,  # a stub trainer: no personal training
        )

    # the service's hooks ---------------------------------------------------------------------------------------------
    def _settings(self, fid: str) -> dict[str, Any]:
        path = self.state.federation_dir(fid) / SETTINGS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _save_settings(self, fid: str, settings: Mapping[str, Any]) -> None:
        atomic_write_text(self.state.federation_dir(fid) / SETTINGS_FILE, json.dumps(dict(settings), indent=2), 0o600)

    def _train(
        self,
        descriptor: FederationDescriptor,
        global_tensors: Mapping[str, np.ndarray],
        r: int,
        stop: threading.Event,
        account: Account,
    ) -> Trained:
        settings = self._settings(descriptor.federation_id)
        data = settings.get("data")
        if not data:
            raise FederationError(f"no local data set for federation {descriptor.name} (join with --data FILE)")
        options = {k: v for k, v in (settings.get("train_options") or {}).items() if k not in PERSONAL_ONLY} or None
        dataset = file_digest(Path(data))
        spend = self._round_spend(descriptor, data, options)
        if spend is not None:
            account(spend, dataset)  # refused past the federation's budget or the dataset's limit: nothing is trained
        dp_sgd: LocalDpSgd | RoundDpSgd | None = descriptor.privacy.dp.local_dp_sgd
        if descriptor.example_level:
            assert spend is not None
            dp_sgd = round_dp_sgd(descriptor, spend)
        result = self._fit(
            descriptor, global_tensors, Path(data), r, dp_sgd, stop, options, freeze_a=descriptor.adapter.freeze_a
        )
        trained_spend = spend if descriptor.example_level else None  # user-level: the release's noise is the spend
        return Trained(
            result.tensors,
            result.examples,
            result.heldout_loss_before,
            result.heldout_loss_after,
            trained_spend,
            dataset,
        )

    def _round_spend(self, descriptor: FederationDescriptor, data: str | None, options: Any) -> Spend | None:
        """What one round of `descriptor` costs this node on `data` (example-level modes need the data)."""
        if not descriptor.example_level:
            return round_spend(descriptor)
        if not data:
            raise FederationError(f"mode {descriptor.privacy.mode!r}: a member trains on local data (give --data)")
        return round_spend(descriptor, round_sample_rate(Path(data), options))

    def _install(self, descriptor: FederationDescriptor, tensors: Mapping[str, np.ndarray]) -> str:
        a = descriptor.adapter
        return install_global(
            self.adapters, adapter_name(descriptor), tensors, self.gguf, a.rank, a.alpha, a.targets
        ).key

    def _personalize(
        self, descriptor: FederationDescriptor, global_tensors: Mapping[str, np.ndarray], r: int, stop: threading.Event
    ) -> dict[str, Any] | None:
        """Train this node's personal adapter on top of the new global (its own data, `local_steps` steps, from the
        last personal one, anchored to the global on text the global writes) and install it as `fed-<name>-me`;
        None when the member chose none or has no data.

        It never leaves the node, but it is trained on the same data: in example-level modes with DP-SGD at the
        federation's z and C and this node's q, checked against and recorded in the dataset's ledger (before the
        adapter is installed), so a personal adapter published later is covered like everything else."""
        settings = self._settings(descriptor.federation_id)
        data = settings.get("data")
        if not settings.get("personal", True) or not data:
            return None
        a, name = descriptor.adapter, personal_name(descriptor)
        anchor = {"anchor_samples": PERSONAL_ANCHOR_SAMPLES, "anchor_weight": PERSONAL_ANCHOR_WEIGHT}
        options = anchor | dict(settings.get("train_options") or {})
        start = self._current_tensors(name, descriptor)
        dataset = file_digest(Path(data))
        spend = round_spend(descriptor, round_sample_rate(Path(data), options)) if descriptor.example_level else None
        key, delta = f"personal:{descriptor.federation_id}", descriptor.privacy.dp.delta
        on = DatasetBudget(dataset, self.policy.max_epsilon_per_dataset, self.policy.max_delta)
        dp_sgd = None
        if spend is not None:
            with PrivacyLedger(self.ledger_path) as ledger:
                decision = ledger.check_budget(key, r, spend, delta, self.policy.max_epsilon_per_dataset, on)
            if not decision.allowed:
                raise FederationError(f"personal adapter not trained: {decision.reason}")
            dp_sgd = round_dp_sgd(descriptor, spend)
        result = self._fit(descriptor, start, Path(data), r, dp_sgd, stop, options, under=global_tensors)
        if spend is not None:
            with PrivacyLedger(self.ledger_path) as ledger:
                ledger.record(key, r, spend, delta, budget=self.policy.max_epsilon_per_dataset, dataset=on)
        version = install_global(self.adapters, name, result.tensors, self.gguf, a.rank, a.alpha, a.targets)
        return {
            "personal": version.key,
            "serve_as": f"base:{adapter_name(descriptor)}+{name}",
            "personal_heldout_loss": [round(result.heldout_loss_before, 4), round(result.heldout_loss_after, 4)],
        }

    def _fit(
        self,
        descriptor: FederationDescriptor,
        start: Mapping[str, np.ndarray],
        data: Path,
        r: int,
        dp_sgd: LocalDpSgd | RoundDpSgd | None,
        stop: threading.Event,
        options: Mapping[str, Any] | None,
        **extra: Any,
    ) -> LocalResult:
        """Train the federation's LoRA from `start` for its `local_steps` on `data` (seeded by the round);
        `extra`: train_locally's freeze_a or under."""
        a = descriptor.adapter
        return train_locally(
            self.home,
            self.gguf,
            start,
            a.rank,
            a.alpha,
            a.targets,
            data,
            descriptor.local_steps,
            seed=r,
            dp_sgd=dp_sgd,
            stop=stop,
            options=options,
            **extra,
        )

    def _current_tensors(self, name: str, descriptor: FederationDescriptor) -> dict[str, np.ndarray]:
        """The installed adapter `name`'s tensors when they fit the federation's LoRA; its zero-B start otherwise."""
        a = descriptor.adapter
        try:
            folder = self.adapters.current(name).gguf.parent
            tensors = load_peft_tensors(folder)
            if Layout.of(tensors) == Layout.of(self._initial_global(descriptor)):
                return tensors
            log.warning(
                "adapter %s does not fit federation %s's LoRA: the personal one starts over", name, descriptor.name
            )
        except LookupError:
            pass  # none yet: the first personal adapter
        except (OSError, ValueError) as exc:
            log.warning("adapter %s unreadable (%s): the personal one starts over", name, exc)
        return initial_adapter(self.gguf, a.rank, a.alpha, a.targets, seed=f"{descriptor.federation_id}/personal")

    def _initial_global(self, descriptor: FederationDescriptor) -> dict[str, np.ndarray]:
        fid = descriptor.federation_id
        if fid not in self._initial:
            a = descriptor.adapter
            self._initial[fid] = initial_adapter(self.gguf, a.rank, a.alpha, a.targets, seed=fid)
        return self._initial[fid]

    # commands ------------------------------------------------------------------------------------------------------
    async def create(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Sign a new federation descriptor, publish it in the DHT and start it (this node is its first member)."""
        mode = spec["mode"]
        he = HeParams() if "he" in mode else None
        local = spec.get("local_dp_sgd")
        privacy = Privacy(
            mode=mode,
            dp=DpParams(
                clip_norm=float(spec.get("clip_norm", 1.0)),
                noise_multiplier=float(spec.get("noise_multiplier", 1.0 if mode != "he" else 0.0)),
                delta=float(spec.get("delta", 1e-5)),
                local_dp_sgd=LocalDpSgd(**local) if local else None,
            ),
            he=he,
        )
        digest = await trio.to_thread.run_sync(file_digest, self.gguf)
        data = sign_descriptor(
            self.identity,
            name=spec["name"],
            base_sha256=digest,
            adapter=AdapterConfig(
                rank=int(spec.get("rank", 4)),
                alpha=float(spec.get("alpha", 8.0)),
                targets=tuple(spec.get("targets", ("q_proj", "v_proj"))),
                freeze_a=spec.get("lora", "ab") == "ffa",
            ),
            privacy=privacy,
            strategy=StrategySpec(name=spec.get("strategy", "fedavg"), params=dict(spec.get("strategy_params", {}))),
            quorum=int(spec.get("quorum", 2)),
            min_members=int(spec.get("min_members", 2)),
            round_deadline_s=int(spec.get("round_deadline_s", 300)),
            local_steps=int(spec.get("local_steps", 20)),
            epsilon_budget=float(spec.get("epsilon_budget", 8.0)),
            admission=spec.get("admission", "open"),
            update_encoding=spec.get("update_encoding", "f32"),
        )
        descriptor = verify_descriptor(data)
        spend = await trio.to_thread.run_sync(
            self._round_spend, descriptor, spec.get("data"), spec.get("train_options")
        )
        check_descriptor(descriptor, self.policy, spend)  # the creator is its first member
        if descriptor.user_level:
            a = descriptor.adapter
            shapes = await trio.to_thread.run_sync(lambda: adapter_shapes(base_dims(self.gguf), a.rank, a.targets))
            params = sum(
                math.prod(shape) for name, shape in shapes.items() if not (a.freeze_a and name.endswith(LORA_A_SUFFIX))
            )
            members = int(spec.get("expected_members") or descriptor.min_members)
            ratio = check_user_level(descriptor, params, members)
            log.info(
                "federation %s: noise in the mean update ≈ %.3g× an update at %d members", spec["name"], ratio, members
            )
        fid = descriptor.federation_id
        await trio.to_thread.run_sync(self._create_locally, data, descriptor, spec, he)
        await self.dht.publish(data)
        self.service.start(descriptor)
        return self.summary(fid)

    def _create_locally(
        self, data: bytes, descriptor: FederationDescriptor, spec: Mapping[str, Any], he: HeParams | None
    ) -> None:
        fid = descriptor.federation_id
        self.state.add_federation(data, "creator")
        request = sign_join(self.identity, fid, fed_wire.b64(x25519_public_of(self.identity)))
        admission = sign_admission(self.identity, descriptor, request)
        self.state.add_member(fid, verify_admission(descriptor, request, admission), request, admission)
        self._save_settings(
            fid,
            {
                "data": spec.get("data"),
                "train_options": spec.get("train_options", {}),
                "personal": bool(spec.get("personal", True)),
            },
        )
        if he is not None:
            secret = SecretContext.generate(
                HEParams(he.poly_modulus_degree, tuple(he.coeff_mod_bit_sizes), he.global_scale_bits)
            )
            self.state.save_he_secret(fid, secret.serialize())
            self.state.save_he_public(fid, secret.public_bytes())

    async def join(
        self,
        name: str,
        creator: str,
        data: str | None,
        role: str,
        invite: bytes | None,
        train_options: Mapping[str, Any] | None = None,
        personal: bool = True,
    ) -> dict[str, Any]:
        """Find the federation in the DHT and join it through its creator (`personal`: train and serve a personal
        adapter beside the global one after every applied round)."""
        descriptor_bytes = await self._descriptor_bytes(name, creator)
        descriptor = verify_descriptor(descriptor_bytes)
        if role == "member":  # an aggregator-only member releases nothing of its own
            spend = await trio.to_thread.run_sync(self._round_spend, descriptor, data, train_options)
            check_descriptor(descriptor, self.policy, spend)
        await self.service.join(descriptor_bytes, descriptor.creator_key, role, invite)
        settings = {"data": data, "train_options": dict(train_options or {}), "personal": personal}
        self._save_settings(descriptor.federation_id, settings)
        return self.summary(descriptor.federation_id)

    async def _descriptor_bytes(self, name: str, creator: str) -> bytes:
        found = await self.dht.fetch_bytes(name, creator)
        if found is None:
            raise FederationError(f"no federation {name!r} by {creator} was found in the DHT")
        return found

    def leave(self, fid: str) -> bool:
        """Stop taking part in a federation (its state is kept)."""
        return self.state.leave(fid)

    def summary(self, fid: str) -> dict[str, Any]:
        """A federation as the API shows it: rules, members, rounds, privacy spent."""
        row = self.state.federation(fid)
        if row is None:
            raise FederationError(f"unknown federation {fid}")
        d = row.descriptor
        with PrivacyLedger(self.ledger_path) as ledger:
            history = ledger.history(fid)
        spent = epsilon(history, d.privacy.dp.delta) if history else 0.0
        members = self.service.membership.members(fid)
        return {
            "federation_id": fid,
            "name": d.name,
            "creator": d.creator,
            "role": row.role,
            "active": row.left_at is None,
            "mode": d.privacy.mode,
            "strategy": d.strategy.name,
            "updates": update_kind(d),
            "quorum": d.quorum,
            "members": sorted(f"{fp} ({m.role})" for fp, m in members.items()),
            "global_round": row.global_round,
            "global_cid": row.global_cid,
            "adapter": adapter_name(d),
            "epsilon_spent": round(spent, 4),
            "epsilon_budget": d.epsilon_budget,
            "delta": d.privacy.dp.delta,
            "unit_of_privacy": unit_of_privacy(d),
            "he_secret_here": self.state.he_secret(fid) is not None,
            "status": self.service.status_of.get(fid, {}),
        }

    def rounds(self, fid: str, limit: int = 50) -> list[dict[str, Any]]:
        """The federation's rounds, newest first, and refused updates."""
        return [
            {
                "round": r.round,
                "aggregator": r.aggregator,
                "status": r.status,
                "contributors": list(r.contributors),
                "aggregate_cid": r.aggregate_cid,
                "reason": r.reason,
            }
            for r in self.state.rounds(fid, limit)
        ]

    def privacy_total(self) -> float:
        """ε over every federation (composed), at δ = 1e-5."""
        with PrivacyLedger(self.ledger_path) as ledger:
            return float(ledger.total(1e-5))

    def privacy_by_dataset(self) -> list[dict[str, Any]]:
        """Per dataset (sha256 of its file): ε spent over everything that touched it, of the node's limit."""
        delta, limit = self.policy.max_delta, self.policy.max_epsilon_per_dataset
        with PrivacyLedger(self.ledger_path) as ledger:
            return [
                {
                    "dataset": digest or "unknown (recorded before datasets were)",
                    "epsilon_spent": round(ledger.spent_on(digest, delta), 4),
                    "epsilon_limit": limit,
                    "delta": delta,
                    "spent_by": spenders,
                }
                for digest, spenders in ledger.datasets().items()
            ]


def round_dp_sgd(descriptor: FederationDescriptor, spend: Spend) -> RoundDpSgd:
    """DP-SGD at the federation's z, C and δ with this node's sample rate (example-level modes)."""
    dp = descriptor.privacy.dp
    return RoundDpSgd(spend.noise_multiplier, spend.sample_rate, dp.clip_norm, dp.delta)


def personal_name(descriptor: FederationDescriptor) -> str:
    """The adapter this member trains for itself beside the federation's global one."""
    return f"{adapter_name(descriptor)[:61]}-me"


def adapter_name(descriptor: FederationDescriptor) -> str:
    """The adapter a federation's global model is installed as."""
    return f"fed-{descriptor.name}"[:64]
