"""Federated learning quality: held-out loss of local-only, FedAvg, he, dp, he+dp, dp-user and personal adapters.

Data: one category of Debian's `fortunes` package per node (`bash scripts/install.sh --bench` installs it and
matplotlib; the files live in /usr/share/games/fortunes, entries separated by lines holding only `%`). Each category
is cleaned (overstrike backspaces and control characters removed, blank lines inside an entry dropped so that the
trainer's `.txt` format keeps one entry per paragraph, duplicates removed), shuffled with a fixed seed and cut into a
held-out split (a fraction, capped) and a training split of the same size on every node. Settings: `large` (default:
people, definitions, cookie, computers; 900 training entries per node, at most 100 held out) and `small` (computers,
definitions, songs-poems, startrek; 180 and 40, the setting before issue 15).

Training runs through the project's own code paths: `node.fed.adapter.initial_adapter` gives the round-0 adapter
(seeded; lora_B zero, so it is the base model), `node.fed.adapter.train_locally` runs the real training subprocess
(`python -m node.training.job`, torch + peft + opacus, nice 19) from a global adapter and returns the trained
tensors. Every federated row runs R rounds of `steps` local steps on every node (the same number of steps in every
row); rows are named MODE:LORA[:EPSILON][:q8][:personal] (`--rows`):

- base: the base model; local-only: each node trains its own adapter (A+B) for R x steps steps in one run.
- fedavg: updates (local - global, `federation.privacy.delta_of`) neither clipped nor noised, averaged by
  `federation.strategies` FedAvg with equal weights. A descriptor cannot express it (dp needs noise), so the
  descriptor machinery is bypassed for this row only.
- he, dp, he+dp, dp-user: a real signed `FederationDescriptor` of the mode and `federation.privacy` (`release`,
  `combine`, `mean_update`, `apply_update`), with a real CKKS key set for the he modes. he: updates clipped to the
  update norm C (--clip), encrypted, summed blind. dp, he+dp (example-level): members train with DP-SGD (opacus:
  Poisson sampling at q = batch / training entries, per-example clipping to --example-clip, noise z) at the z that
  makes R x steps steps at q cost the row's ε (PRV, `crypto.dp.epsilon`, δ = --delta; `noise_for`); the update is
  released as trained; their batch and learning rate are the node's DP-SGD defaults (64, 1e-2: --dp-batch-size,
  --dp-lr), the plain rows' are --batch-size and --lr (4, 3e-3). dp-user: one Gaussian release per round of the
  update clipped to --clip, z calibrated for R releases at q = 1 (a member's whole update is the unit; seeded numpy
  noise).
- LORA: ffa (lora_A frozen at the seeded init, only lora_B trained, sent and averaged: exact aggregation) or ab.
- :q8: updates travel as 8-bit codes with a scale per tensor, stochastically rounded (`federation.quantize`, the
  descriptor's update_encoding "q8"; for fedavg each update is quantized and dequantized the same way); not with he
  modes. Every row records the bytes of the updates it sent (float32 safetensors, q8 or CKKS).
- :personal: after each round every node also trains a personal adapter over the new global (`under=`, the
  node's own data, the same steps; from its previous one, as the node does, or with --personal-fresh from its seeded
  init every round), anchored as the node anchors it (--personal-anchor texts sampled from the global, KL weight
  --personal-anchor-weight; 0 texts: no anchor); "+ personal" evaluates each node's global + personal pair (as one
  LoRA of twice the rank, `concatenated`).

Evaluation: the trainer's own held-out metric (`node.training.trainer.evaluate_loss`) on every domain's held-out
split, with the torch twin of the embedded GGUF and the adapter loaded by `load_initial_adapter`. "own" is the mean
over nodes of the loss on that node's domain (for local-only and personal pairs: each node's own model; for one
global adapter: the mean over domains), "other" the mean over nodes of the mean loss on the other domains. "keeps"
is the share of FedAvg's held-out loss gain over the base (same LoRA variant) that a row keeps; the plot draws it
against ε per mode (docs/federated_quality.png).

Cost: every local training is its own subprocess; --parallel jobs of --threads torch threads run side by side.

Prints a progress line per step and the tables; writes bench/results/federated_quality.json and the plot.

    nice -n 10 .venv/bin/python bench/federated_quality.py [--quick] [--setting large|small] [--rounds 4]
        [--steps 10] [--dp-batch-size 16] [--rows fedavg:ffa:personal,fedavg:ab,dp:ffa:8,...]
"""

import argparse
import math
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import FORTUNES_DIR, INSTALL_HINT, positive_int, read_fortunes, write_json
from node.training.trainer import DP_BATCH_SIZE, DP_LEARNING_RATE, PERSONAL_ANCHOR_SAMPLES, PERSONAL_ANCHOR_WEIGHT

ROOT = Path(__file__).resolve().parent.parent
FED_MODES = ("fedavg", "he", "dp", "he+dp", "dp-user")
DEFAULT_ROWS = (
    "fedavg:ffa,fedavg:ab,fedavg:ffa:personal,he:ffa,he:ab,"
    "dp:ffa:8,dp:ab:8,dp:ffa:3,dp:ab:3,dp:ffa:1,dp:ab:1,he+dp:ffa:8,he+dp:ab:8,dp-user:ffa:8,dp-user:ab:8"
)

Tensors = dict[str, np.ndarray]


@dataclass
class Row:
    """One line of the table: what was evaluated, its mean held-out losses, and the per-domain numbers."""

    name: str
    own: float
    other: float
    notes: str = ""
    per_domain: dict[str, dict[str, float]] = field(default_factory=dict)  # evaluated model -> {domain: loss}


@dataclass(frozen=True)
class Domain:
    """One node's data: its fortunes category, training entries (written to `train_file`) and held-out entries."""

    name: str
    train: list[str]
    heldout: list[str]
    train_file: Path
    available: int


# --- data ---------------------------------------------------------------------------------------------------------


def load_domains(
    names: Sequence[str],
    folder: Path,
    work: Path,
    train_size: int,
    heldout_fraction: float,
    heldout_cap: int,
    seed: int,
) -> list[Domain]:
    """Read, shuffle (seeded) and split each category; every node gets the same train and held-out sizes."""
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        sys.exit(
            f"fortunes categories {', '.join(missing)} not found in {folder}: install Debian's fortunes package "
            f"with {INSTALL_HINT}"
        )
    entries = {n: read_fortunes(folder / n) for n in names}
    smallest = min(len(e) for e in entries.values())
    total = min(smallest, train_size + heldout_cap)
    n_held = min(heldout_cap, max(1, round(total * heldout_fraction)))
    n_train = min(train_size, total - n_held)
    if n_train < 8:
        sys.exit(f"too few entries: the smallest category has {smallest}")
    domains = []
    for name in names:
        order = list(entries[name])
        random.Random(f"{seed}/{name}").shuffle(order)
        held, train = order[:n_held], order[n_held : n_held + n_train]
        path = work / "data" / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(train) + "\n", encoding="utf-8")
        domains.append(Domain(name, train, held, path, len(entries[name])))
    return domains


# --- evaluation ---------------------------------------------------------------------------------------------------


class Evaluator:
    """The torch twin with a peft LoRA of the experiment's shape: any adapter's loss on every held-out domain."""

    def __init__(
        self,
        base_folder: Path,
        domains: Sequence[Domain],
        rank: int,
        alpha: float,
        targets: str,
        max_length: int,
        threads: int,
    ) -> None:
        import torch
        from peft import get_peft_model

        from node.training.base_model import load_torch_base
        from node.training.data import Example
        from node.training.trainer import TrainConfig, encode_example, lora_config

        torch.set_num_threads(threads)
        base, tokenizer = load_torch_base(base_folder)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.config = TrainConfig(targets=targets, rank=rank, alpha=alpha, max_length=max_length)
        self.model = get_peft_model(base, lora_config(rank, alpha, targets))  # as the trainer builds it
        self.model.eval()
        self.encoded = {
            d.name: [
                encode_example(tokenizer, Example(text=t, where=f"{d.name}:{i}"), max_length)
                for i, t in enumerate(d.heldout)
            ]
            for d in domains
        }
        self.tokens = {name: sum(min(len(e.ids), max_length) for e in enc) for name, enc in self.encoded.items()}
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-fedq-eval-"))

    def losses(self, tensors: Mapping[str, np.ndarray] | None) -> dict[str, float]:
        """{domain: held-out loss} of the base model with `tensors` as its LoRA (None: the adapter disabled)."""
        import safetensors.numpy

        from node.training.trainer import evaluate_loss, load_initial_adapter

        if tensors is None:
            with self.model.disable_adapter():
                return {n: evaluate_loss(self.model, e, self.config, self.pad_id) for n, e in self.encoded.items()}
        path = self.tmp / "adapter.safetensors"
        safetensors.numpy.save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path)
        )
        load_initial_adapter(self.model, path)
        return {n: evaluate_loss(self.model, e, self.config, self.pad_id) for n, e in self.encoded.items()}

    def close(self) -> None:
        """Remove the temp folder."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def own_other(per_node: Mapping[str, Mapping[str, float]]) -> tuple[float, float]:
    """(mean over nodes of the loss on the node's own domain, mean over nodes of its mean loss on the other domains).

    `per_node` maps a node's domain to the {domain: loss} of the model evaluated for that node.
    """
    own = [losses[node] for node, losses in per_node.items()]
    other = [float(np.mean([v for d, v in losses.items() if d != node])) for node, losses in per_node.items()]
    return float(np.mean(own)), float(np.mean(other))


# --- the experiment ---------------------------------------------------------------------------------------------


class Progress:
    """Numbered progress lines on stderr with elapsed time."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.began = total, 0, time.monotonic()

    def step(self, what: str) -> None:
        """Count one step of the experiment and print it."""
        self.done += 1
        elapsed = time.monotonic() - self.began
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done:3d}/{self.total}] {elapsed:6.0f} s (eta {eta:4.0f} s)  {what}", file=sys.stderr, flush=True)


@dataclass
class Setup:
    """Everything the training runs share."""

    home: Any  # NodeHome
    gguf: Path
    rank: int
    alpha: float
    targets: tuple[str, ...]
    steps: int
    options: dict[str, Any]
    dp_options: dict[str, Any]  # DP-SGD rows: their own batch size and learning rate (the same steps)
    parallel: int
    personal_fresh: bool = False  # personal adapters start from their seeded init every round (not from the last)
    personal_options: dict[str, Any] = field(default_factory=dict)  # options + the anchor (--personal-anchor)


@dataclass(frozen=True)
class RowSpec:
    """One federated row: the mode, the LoRA variant (ffa: lora_A frozen; ab: both trained and averaged), the target
    ε over the whole run (DP modes), and whether members also train personal adapters over each new global."""

    mode: str  # fedavg | he | dp | he+dp | dp-user
    lora: str  # ffa | ab
    epsilon: float | None = None
    personal: bool = False
    q8: bool = False  # 8-bit updates

    @property
    def key(self) -> str:
        """The row's name in --rows and in the JSON: mode:lora[:epsilon][:q8][:personal]."""
        parts = [self.mode, self.lora] + ([f"{self.epsilon:g}"] if self.epsilon is not None else [])
        return ":".join(parts + (["q8"] if self.q8 else []) + (["personal"] if self.personal else []))

    @property
    def example_level(self) -> bool:
        """DP-SGD inside each member's training (dp, he+dp)."""
        return self.mode in ("dp", "he+dp")


def parse_row(text: str) -> RowSpec:
    """`mode:lora[:epsilon][:q8][:personal]` (e.g. dp:ffa:8, fedavg:ab:q8, fedavg:ffa:personal); ValueError naming
    what is wrong."""
    parts = text.split(":")
    if len(parts) < 2 or parts[0] not in FED_MODES or parts[1] not in ("ffa", "ab"):
        raise ValueError(f"row {text!r}: expected MODE:ffa|ab[:EPSILON][:q8][:personal], MODE one of {FED_MODES}")
    flags = {p for p in parts[2:] if p in ("q8", "personal")}
    personal, q8 = "personal" in flags, "q8" in flags
    rest = [p for p in parts[2:] if p not in flags]
    dp = parts[0] not in ("fedavg", "he")
    if len(rest) != int(dp):
        raise ValueError(f"row {text!r}: {'give' if dp else 'no'} a target epsilon for mode {parts[0]}")
    eps = float(rest[0]) if rest else None
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"row {text!r}: epsilon must be a positive number")
    if personal and parts[0] != "fedavg":
        raise ValueError(f"row {text!r}: personal adapters are measured over the FedAvg rows")
    if q8 and parts[0].startswith("he"):
        raise ValueError(f"row {text!r}: mode {parts[0]} sends CKKS ciphertexts, not 8-bit updates")
    return RowSpec(parts[0], parts[1], eps, personal, q8)


def train_nodes(
    setup: Setup,
    domains: Sequence[Domain],
    starts: Sequence[Mapping[str, np.ndarray]],
    steps: int,
    seed: int,
    label: str,
    progress: Progress,
    *,
    dp_sgd: Any = None,
    freeze_a: bool = False,
    under: Mapping[str, np.ndarray] | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Train every node from its start for `steps` steps (`parallel` jobs at a time); their LocalResults in node
    order. `dp_sgd` (a RoundDpSgd), `freeze_a` and `under` (a global merged under a personal adapter) are
    node.fed.adapter.train_locally's; `options` replaces the setup's."""
    from node.fed.adapter import train_locally

    def one(d: Domain, start: Mapping[str, np.ndarray]) -> Any:
        result = train_locally(
            setup.home,
            setup.gguf,
            start,
            setup.rank,
            setup.alpha,
            setup.targets,
            d.train_file,
            steps,
            seed=seed,
            dp_sgd=dp_sgd,
            options=options if options is not None else setup.dp_options if dp_sgd is not None else setup.options,
            freeze_a=freeze_a,
            under=under,
        )
        progress.step(
            f"{label} {d.name}: {result.steps} steps in {result.seconds:.0f} s, trainer held-out loss "
            f"{result.heldout_loss_before:.3f} -> {result.heldout_loss_after:.3f}"
        )
        return result

    with ThreadPoolExecutor(max_workers=setup.parallel) as pool:
        return list(pool.map(one, domains, starts))


def make_descriptor(spec: RowSpec, setup: Setup, clip: float, z: float, delta: float, quorum: int) -> Any:
    """A real signed and verified FederationDescriptor of the row's mode and LoRA variant."""
    from crypto.identity import Identity
    from federation.descriptor import (
        AdapterConfig,
        DpParams,
        HeParams,
        Privacy,
        sign_descriptor,
        verify_descriptor,
    )
    from node.training.base_model import file_digest

    privacy = Privacy(
        mode=spec.mode,  # type: ignore[arg-type]  # one of the PrivacyMode literals
        dp=DpParams(clip_norm=clip, noise_multiplier=z if "dp" in spec.mode else 0.0, delta=delta),
        he=HeParams() if "he" in spec.mode else None,
    )
    data = sign_descriptor(
        Identity.generate(),
        name=f"bench-{spec.mode.replace('+', '-')}",
        base_sha256=file_digest(setup.gguf),
        adapter=AdapterConfig(rank=setup.rank, alpha=setup.alpha, targets=setup.targets, freeze_a=spec.lora == "ffa"),
        privacy=privacy,
        quorum=quorum,
        min_members=quorum,
        local_steps=setup.steps,
        epsilon_budget=1e6,
        update_encoding="q8" if spec.q8 else "f32",
    )
    return verify_descriptor(data)


def noise_for(target: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier z (to 0.1 %) whose PRV ε over `steps` Poisson-sampled releases at
    `sample_rate` is at most `target`: the bench's calibration, the node's own accountant."""
    from crypto.dp import epsilon

    low, high = 0.05, 200.0
    if epsilon([(high, sample_rate, steps)], delta) > target:
        raise ValueError(f"ε = {target} is out of reach at q = {sample_rate:.4g}, {steps} steps")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if epsilon([(mid, sample_rate, steps)], delta) <= target else (mid, high)
    return high


def concatenated(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> Tensors:
    """Two LoRAs of rank r as one of rank 2r (A stacked, B side by side): at alpha 2·alpha its scale alpha'/2r
    equals each one's alpha/r, so it computes exactly W + ΔW_first + ΔW_second."""
    out: Tensors = {}
    for name, a in first.items():
        axis = 0 if name.endswith("lora_A.weight") else 1
        out[name] = np.concatenate([a, second[name]], axis=axis).astype(np.float32)
    return out


def federate(
    spec: RowSpec,
    setup: Setup,
    domains: Sequence[Domain],
    initial: Tensors,
    rounds: int,
    seed: int,
    privacy: Mapping[str, float],
    evaluator: Evaluator,
    personal_evaluator: "Evaluator | None",
    progress: Progress,
    eval_every_round: bool,
) -> dict[str, Any]:
    """R rounds of one row; the final global adapter's losses, per-round losses and update statistics (and, with
    personal adapters, each node's loss with the global + its personal adapter)."""
    from crypto.dp import epsilon
    from crypto.he import HEParams, SecretContext
    from federation.privacy import (
        apply_update,
        combine,
        delta_of,
        mean_update,
        noise_std_of_sum,
        release,
        round_spend,
        update_layout,
    )
    from federation.quantize import dequantize, quantize
    from federation.strategies import make_strategy
    from federation.strategies.base import Update
    from federation.update import encode_tensors, flatten, unflatten
    from node.fed.adapter import RoundDpSgd, initial_adapter, round_sample_rate

    n = len(domains)
    steps = setup.steps
    descriptor = secret = public = dp_sgd = None
    z = 0.0
    if spec.mode != "fedavg":
        if spec.example_level:
            q = round_sample_rate(domains[0].train_file, setup.dp_options)  # every node holds as many entries
            assert spec.epsilon is not None
            z = noise_for(spec.epsilon, q, rounds * steps, privacy["delta"])
            clip = privacy["example_clip"]
        elif spec.mode == "dp-user":
            assert spec.epsilon is not None
            z = noise_for(spec.epsilon, 1.0, rounds, privacy["delta"])  # one release per round, noise share 1
            clip = privacy["clip"]
        else:
            clip = privacy["clip"]
        descriptor = make_descriptor(spec, setup, clip, z, privacy["delta"], n)
        if descriptor.example_level:
            spend = round_spend(descriptor, q)
            assert spend is not None
            dp_sgd = RoundDpSgd(spend.noise_multiplier, spend.sample_rate, clip, privacy["delta"])
        if descriptor.uses_he:
            he = descriptor.privacy.he
            assert he is not None
            secret = SecretContext.generate(
                HEParams(he.poly_modulus_degree, tuple(he.coeff_mod_bit_sizes), he.global_scale_bits)
            )
            public = secret.public()
    freeze_a = spec.lora == "ffa"
    layout = update_layout(descriptor, initial) if descriptor is not None else _ffa_layout(initial, freeze_a)
    global_tensors = dict(initial)
    personal = personal_init = [
        initial_adapter(setup.gguf, setup.rank, setup.alpha, setup.targets, seed=f"bench-personal-{d.name}")
        for d in domains
    ]
    history: list[tuple[float, float, int]] = []
    per_round: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        label = f"{spec.key} round {r}/{rounds}"
        results = train_nodes(
            setup, domains, [global_tensors] * n, steps, seed + r, label, progress, dp_sgd=dp_sgd, freeze_a=freeze_a
        )
        began = time.monotonic()
        deltas = [delta_of(res.tensors, global_tensors, layout) for res in results]
        norms = [float(np.linalg.norm(flatten(d, layout).astype(np.float64))) for d in deltas]
        payload_bytes = 0
        if descriptor is None:
            strategy = make_strategy("fedavg")
            updates = []  # equal weights, as the node aggregates (federation.privacy.combine)
            for i, (d, delta) in enumerate(zip(domains, deltas, strict=True)):
                if spec.q8:  # what a q8 federation's member sends and its aggregator decodes
                    payload = quantize(delta, layout, np.random.default_rng([seed, r, i]))
                    delta = dequantize(payload, layout, len(payload))
                else:
                    payload = encode_tensors(delta)
                payload_bytes += len(payload)
                updates.append(Update(d.name, flatten(delta, layout), 1))
            mean = unflatten(strategy.aggregate(updates).vector.astype(np.float32), layout)
        else:
            sent = []
            for i, (d, delta, res) in enumerate(zip(domains, deltas, results, strict=True)):
                rng = np.random.default_rng([seed, r, i, FED_MODES.index(spec.mode)])
                spent = round_spend(descriptor, res.sample_rate) if descriptor.example_level else None
                released = release(delta, layout, descriptor, public, rng=rng, trained=spent)
                payload_bytes += len(released.payload)
                sent.append((d.name, released.payload))
                if i == 0 and released.spend is not None:  # every node spends the same: node 0's history
                    history.append(tuple(released.spend))  # type: ignore[arg-type]
            combined = combine(sent, layout, descriptor, public)
            mean = mean_update(combined.kind, combined.payload, combined.count, layout, secret)
        global_tensors = apply_update(global_tensors, mean)
        aggregate_s = time.monotonic() - began
        if spec.personal:
            starts = personal_init if setup.personal_fresh else personal
            personal = [
                res.tensors
                for res in train_nodes(
                    setup,
                    domains,
                    starts,
                    steps,
                    seed + r,
                    f"{label} personal",
                    progress,
                    under=global_tensors,
                    options=setup.personal_options,
                )
            ]
        losses = evaluator.losses(global_tensors) if (eval_every_round or r == rounds) else None
        own, other = own_other({d.name: losses for d in domains}) if losses else (math.nan, math.nan)
        mean_norm = float(np.linalg.norm(flatten(mean, layout).astype(np.float64)))
        progress.step(
            f"{label}: aggregated in {aggregate_s:.1f} s, update norms "
            f"{', '.join(f'{x:.2f}' for x in norms)}, mean-update norm {mean_norm:.2f}"
            + (f"; global own {own:.3f} other {other:.3f}" if losses else "")
        )
        per_round.append(
            {
                "round": r,
                "losses": losses,
                "own": own if losses else None,
                "other": other if losses else None,
                "update_norms": norms,
                "clipped": [x > clip for x in norms] if descriptor is not None and not spec.example_level else None,
                "mean_update_norm": mean_norm,
                "payload_bytes": payload_bytes,
                "aggregate_s": aggregate_s,
                "trainer_heldout": [[res.heldout_loss_before, res.heldout_loss_after] for res in results],
                "train_s": [res.seconds for res in results],
            }
        )
    out: dict[str, Any] = {
        "losses": per_round[-1]["losses"],
        "rounds": per_round,
        "descriptor": _describe(descriptor),
        "noise_multiplier": z,
        "epsilon": epsilon(history, privacy["delta"]) if history else None,
        "epsilon_history": [list(h) for h in history],
        "update_values": layout.size,
        "bytes_per_update": sum(p["payload_bytes"] for p in per_round) / (rounds * n),
    }
    if descriptor is not None and descriptor.user_level:
        noise_std = noise_std_of_sum(descriptor, n) / n
        out["expected_noise_norm_of_mean_update"] = noise_std * math.sqrt(layout.size)
    if spec.personal:
        assert personal_evaluator is not None
        out["personal_losses"] = {
            d.name: personal_evaluator.losses(concatenated(global_tensors, p))
            for d, p in zip(domains, personal, strict=True)
        }
        progress.step(f"{spec.key}: global + personal adapters evaluated")
    return out


def _ffa_layout(tensors: Tensors, freeze_a: bool) -> Any:
    """The update layout without a descriptor (the FedAvg rows): lora_B only under FFA-LoRA."""
    from federation.privacy import LORA_A_SUFFIX
    from federation.update import Layout

    return Layout.of({k: v for k, v in tensors.items() if not (freeze_a and k.endswith(LORA_A_SUFFIX))})


def _describe(descriptor: Any) -> dict[str, Any] | None:
    if descriptor is None:
        return None
    from federation.descriptor import describe

    return describe(descriptor)


# --- main ---------------------------------------------------------------------------------------------------------


def print_table(rows: Sequence[Row], base: Row) -> None:
    """The table: mean held-out loss on the node's own domain and on the other domains, and the change vs base."""
    width = max(len(r.name) for r in rows)
    print(f"\n{'model':<{width}}  {'own':>7}  {'vs base':>8}  {'other':>7}  {'vs base':>8}  notes")
    for r in rows:
        print(
            f"{r.name:<{width}}  {r.own:7.3f}  {r.own - base.own:+8.3f}  {r.other:7.3f}  {r.other - base.other:+8.3f}  "
            f"{r.notes}"
        )


def print_domains(rows: Sequence[Row], domains: Sequence[Domain]) -> None:
    """Per-domain held-out losses of every evaluated model."""
    names = [d.name for d in domains]
    width = max(len(f"{r.name}: {m}") for r in rows for m in r.per_domain)
    print(f"\n{'model':<{width}}  " + "  ".join(f"{n:>12}" for n in names))
    for r in rows:
        for model, losses in r.per_domain.items():
            label = r.name if model == "*" else f"{r.name}: {model}"
            print(f"{label:<{width}}  " + "  ".join(f"{losses[n]:12.3f}" for n in names))


SETTINGS = {  # name: (domains, training entries per node, held-out cap)
    "large": ("people,definitions,cookie,computers", 900, 100),
    "small": ("computers,definitions,songs-poems,startrek", 180, 40),
}


def gain_kept(row: Row, base: Row, reference: Row) -> float:
    """The share of `reference`'s held-out loss gain over the base that `row` keeps (mean over domains)."""
    gain = base.own - reference.own
    return (base.own - row.own) / gain if gain > 0 else math.nan


def personal_rows(
    run: Mapping[str, Any], local: Mapping[str, Mapping[str, float]] | None, domains: Sequence[Domain]
) -> dict[str, Any]:
    """Per node: global + personal on its own domain against local-only, and on the others against the global."""
    out: dict[str, Any] = {}
    for d in domains:
        mine = run["personal_losses"][d.name]
        others = [x.name for x in domains if x.name != d.name]
        out[d.name] = {
            "own": mine[d.name],
            "own_local_only": local[d.name][d.name] if local else None,
            "other": float(np.mean([mine[o] for o in others])),
            "other_global": float(np.mean([run["losses"][o] for o in others])),
        }
    return out


def plot(path: Path, points: Mapping[str, list[tuple[float, float]]], title: str) -> bool:
    """Gain kept (vs FedAvg of the same LoRA variant) against ε, one line per mode and variant; False without
    matplotlib (`bash scripts/install.sh --bench` installs it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xy in sorted(points.items()):
        xy = sorted(xy)
        ax.plot([x for x, _ in xy], [100 * y for _, y in xy], marker="o", label=label)
    ax.axhline(100, color="grey", lw=0.8, ls=":")
    ax.axhline(60, color="tab:red", lw=0.8, ls="--", label="goal at ε = 8: 60 %")
    ax.set_xscale("log")
    ax.set_xlabel("ε (δ = 1e-5), whole run")
    ax.set_ylabel("% of FedAvg's held-out loss gain kept")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    """Run the experiment, print the tables, write the JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 steps, 24 train / 8 held-out entries")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="large", help="domains and data sizes")
    ap.add_argument("--domains", default=None, help="comma-separated fortunes categories, one per node")
    ap.add_argument("--fortunes-dir", type=Path, default=FORTUNES_DIR)
    ap.add_argument("--train-size", type=positive_int, default=None, help="training entries per node")
    ap.add_argument("--heldout-fraction", type=float, default=0.2)
    ap.add_argument("--heldout-cap", type=positive_int, default=None, help="most held-out entries per node")
    ap.add_argument("--rounds", type=positive_int, default=None, help="federated rounds (default 4)")
    ap.add_argument("--steps", type=positive_int, default=None, help="local steps per round, every row (default 10)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=positive_int, default=4)
    ap.add_argument("--dp-lr", type=float, default=DP_LEARNING_RATE, help="learning rate of the DP-SGD rows")
    ap.add_argument("--dp-batch-size", type=positive_int, default=DP_BATCH_SIZE, help="expected batch of DP-SGD rows")
    ap.add_argument("--rank", type=positive_int, default=4)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument(
        "--max-length", type=positive_int, default=64, help="tokens per example, in training and evaluation"
    )
    ap.add_argument("--clip", type=float, default=10.0, help="update clip norm C (he, dp-user)")
    ap.add_argument("--example-clip", type=float, default=1.0, help="per-example gradient clip C (dp, he+dp)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="MODE:ffa|ab[:EPSILON][:personal], comma-separated")
    ap.add_argument("--no-local", action="store_true", help="skip the local-only row")
    ap.add_argument(
        "--personal-fresh",
        action="store_true",
        help=":personal rows: each round's personal adapter starts from its seeded init, not from the last one",
    )
    ap.add_argument(
        "--personal-anchor",
        type=int,
        default=PERSONAL_ANCHOR_SAMPLES,
        help=":personal rows: texts sampled from the global that the personal adapter must not change (0: none)",
    )
    ap.add_argument("--personal-anchor-weight", type=float, default=PERSONAL_ANCHOR_WEIGHT)
    ap.add_argument("--parallel", type=positive_int, default=4, help="local training jobs at a time")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads per training job")
    ap.add_argument(
        "--eval-threads", type=positive_int, default=1, help="torch threads of the evaluation (this process)"
    )
    ap.add_argument("--eval-every-round", action="store_true", help="evaluate the global adapter after every round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "mirador-bench-models")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "federated_quality.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "federated_quality.png")
    args = ap.parse_args()
    default_domains, default_train, default_cap = SETTINGS[args.setting]
    rounds = args.rounds or (1 if args.quick else 4)
    steps = args.steps or (2 if args.quick else 10)
    train_size = args.train_size or (24 if args.quick else default_train)
    heldout_cap = args.heldout_cap or (8 if args.quick else default_cap)
    try:
        specs = [parse_row(r) for r in args.rows.split(",") if r]
    except ValueError as exc:
        ap.error(f"--rows: {exc}")
    if len({s.key.removesuffix(":personal") for s in specs}) != len(specs):
        ap.error("--rows: a row is listed twice (a :personal row also gives the row without it)")
    if not 0 < args.heldout_fraction < 1:
        ap.error(f"--heldout-fraction must be between 0 and 1, not {args.heldout_fraction}")
    domain_names = [n for n in (args.domains or default_domains).split(",") if n]
    if len(domain_names) < 2:
        ap.error("--domains: give at least 2 categories (one per node; 'other' needs another domain)")
    if not (args.clip > 0 and args.example_clip > 0 and 0 < args.delta < 1):
        ap.error("--clip and --example-clip must be > 0 and --delta in (0, 1)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the twin is built from the local GGUF; never a hub

    from node.core.home import NodeHome
    from node.fed.adapter import initial_adapter, targets_key
    from node.inference.models import embedded_model_path
    from node.training.base_model import ensure_torch_base

    t_start = time.monotonic()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-fedq-"))
    evaluators: list[Evaluator] = []
    try:
        domains = load_domains(
            domain_names, args.fortunes_dir, work, train_size, args.heldout_fraction, heldout_cap, args.seed
        )
        targets = tuple(sorted(t for t in args.targets.split(",") if t))
        gguf = embedded_model_path()
        args.models_dir.mkdir(parents=True, exist_ok=True)
        print(f"torch twin of {gguf.name} in {args.models_dir} (dequantized once if missing)", file=sys.stderr)
        base_folder = ensure_torch_base(args.models_dir, gguf)
        (work / "home").mkdir()
        (work / "home" / "models").symlink_to(args.models_dir.resolve())  # one twin for every training job
        options = {
            "learning_rate": args.lr,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "threads": args.threads,
            "holdout_fraction": 0.05,
        }
        dp_options = options | {
            "learning_rate": args.dp_lr,
            "batch_size": args.dp_batch_size,
        }
        home = NodeHome(work / "home")
        setup = Setup(
            home, gguf, args.rank, args.alpha, targets, steps, options, dp_options, args.parallel, args.personal_fresh
        )
        if args.personal_anchor:
            setup.personal_options = options | {
                "anchor_samples": args.personal_anchor,
                "anchor_weight": args.personal_anchor_weight,
            }
        else:
            setup.personal_options = dict(options)
        privacy = {"clip": args.clip, "example_clip": args.example_clip, "delta": args.delta}
        key = targets_key(targets)
        evaluator = Evaluator(base_folder, domains, args.rank, args.alpha, key, args.max_length, args.eval_threads)
        evaluators.append(evaluator)
        personal_evaluator = None
        if any(s.personal for s in specs):  # global + personal as one LoRA of twice the rank (see `concatenated`)
            personal_evaluator = Evaluator(
                base_folder, domains, 2 * args.rank, 2 * args.alpha, key, args.max_length, args.eval_threads
            )
            evaluators.append(personal_evaluator)
        initial = initial_adapter(gguf, args.rank, args.alpha, targets, seed=f"bench-federated-quality-{args.seed}")
        n = len(domains)
        total = 1 + (0 if args.no_local else 2 * n)
        total += sum(rounds * (n + 1) + (rounds * n + 1 if s.personal else 0) for s in specs)
        progress = Progress(total)
        base_losses = evaluator.losses(None)
        progress.step("base model evaluated: " + ", ".join(f"{k} {v:.3f}" for k, v in base_losses.items()))
        b_own, b_other = own_other({d.name: base_losses for d in domains})
        base = Row("base", b_own, b_other, "no adapter", {"*": base_losses})
        rows = [base]
        runs: dict[str, Any] = {}
        local_losses: dict[str, dict[str, float]] | None = None

        if not args.no_local:
            results = train_nodes(setup, domains, [initial] * n, rounds * steps, args.seed, "local-only", progress)
            local_losses = {}
            for d, res in zip(domains, results, strict=True):
                local_losses[d.name] = evaluator.losses(res.tensors)
                progress.step(f"local-only {d.name} adapter evaluated: own {local_losses[d.name][d.name]:.3f}")
            own, other = own_other(local_losses)
            rows.append(Row("local-only", own, other, f"each node alone, {rounds * steps} steps, A+B", local_losses))
            runs["local"] = {
                "losses": local_losses,
                "trainer_heldout": {
                    d.name: [r.heldout_loss_before, r.heldout_loss_after] for d, r in zip(domains, results, strict=True)
                },
                "train_s": [r.seconds for r in results],
            }

        failed: list[str] = []
        for spec in specs:
            try:
                run = federate(
                    spec,
                    setup,
                    domains,
                    initial,
                    rounds,
                    args.seed,
                    privacy,
                    evaluator,
                    personal_evaluator,
                    progress,
                    args.eval_every_round,
                )
            except Exception as exc:  # one broken row must not lose the others' results (written below)
                print(f"{spec.key} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                runs[spec.key] = {"error": f"{type(exc).__name__}: {exc}"}
                failed.append(spec.key)
                continue
            runs[spec.key] = run
            own, other = own_other({d.name: run["losses"] for d in domains})
            notes = f"{run['update_values']} values, {run['bytes_per_update'] / 1024:.0f} KiB/update"
            if run["epsilon"] is not None:
                notes += f", z={run['noise_multiplier']:.3g}, eps={run['epsilon']:.2f}"
            name = spec.key.removesuffix(":personal")  # its global is that row (personal training leaves it alone)
            rows.append(Row(name, own, other, notes, {"global": run["losses"]}))
            if spec.personal:
                per_node = run["personal_losses"]
                p_own, p_other = own_other(per_node)
                rows.append(Row(f"{name} + personal", p_own, p_other, "global + each node's own", per_node))
                run["personal_vs"] = personal_rows(run, local_losses, domains)

        by_key = {r.name: r for r in rows}
        for r in rows:
            lora = "ab" if ":ab" in r.name else "ffa"
            reference = by_key.get(f"fedavg:{lora}")
            if reference is not None and r is not base:
                r.notes += f"; keeps {100 * gain_kept(r, base, reference):.0f} % of fedavg:{lora}'s gain"
        print_table(rows, base)
        print_domains(rows, domains)
        points: dict[str, list[tuple[float, float]]] = {}
        for spec in specs:
            ref = by_key.get(f"fedavg:{spec.lora}")
            if spec.epsilon is not None and spec.key in by_key and ref is not None:
                kept = gain_kept(by_key[spec.key], base, ref)
                label = f"{spec.mode} ({spec.lora}{', q8' if spec.q8 else ''})"
                points.setdefault(label, []).append((spec.epsilon, kept))
        title = (
            f"{n} nodes ({', '.join(d.name for d in domains)}), {len(domains[0].train)} entries each, "
            f"{rounds} rounds x {steps} steps"
        )
        plotted = plot(args.plot, points, title) if points and not args.quick else False
        result = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "versions": {p: package_version(p) for p in ("torch", "peft", "transformers", "opacus", "tenseal")},
            "model": gguf.name,
            "domains": [
                {
                    "name": d.name,
                    "entries_available": d.available,
                    "train": len(d.train),
                    "heldout": len(d.heldout),
                    "heldout_tokens_evaluated": evaluator.tokens[d.name],
                }
                for d in domains
            ],
            "setup": {
                "setting": args.setting,
                "rounds": rounds,
                "steps_per_round": steps,
                "local_only_steps": rounds * steps,
                "rank": args.rank,
                "alpha": args.alpha,
                "targets": list(targets),
                "options": options,
                "dp_options": dp_options,
                "trainer_holdout_fraction": 0.05,
                "adapter_values": int(sum(v.size for v in initial.values())),
                "update_clip_norm": args.clip,
                "example_clip_norm": args.example_clip,
                "delta": args.delta,
                "quorum": n,
                "seed": args.seed,
                "parallel_jobs": args.parallel,
                "personal_fresh": args.personal_fresh,
                "personal_anchor": args.personal_anchor,
                "personal_anchor_weight": args.personal_anchor_weight,
                "threads_per_job": args.threads,
            },
            "rows": [
                {"name": r.name, "own": r.own, "other": r.other, "notes": r.notes, "per_domain": r.per_domain}
                for r in rows
            ],
            "gain_kept": points,
            "plot": str(args.plot) if plotted else None,
            "runs": runs,
            "total_s": time.monotonic() - t_start,
        }
        write_json(args.out, result)
        print(
            f"\n{n} nodes, {rounds} rounds x {steps} steps; {result['total_s']:.0f} s; wrote {args.out}"
            + (f" and {args.plot}" if plotted else "")
        )
        if failed:
            sys.exit(f"failed: {', '.join(failed)}")
    finally:
        for e in evaluators:
            e.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
