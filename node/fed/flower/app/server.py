"""The ServerApp: Mirador's aggregator on Flower's deployment engine.

1. The initial global adapter: `init-adapter` (a peft `adapter_model.safetensors`, with its `adapter_config.json`
   next to it when present), else a fresh peft LoRA on the torch twin of the embedded GGUF with the configured
   rank, alpha, targets and seed (lora_A seeded, lora_B zero: the adapter starts as a no-op).
2. For each of `num-rounds` rounds: wait until `min-nodes` SuperNodes are connected, sample `fraction` of them,
   send each a `train` message (global adapter + LoRA settings), collect the replies until `round-timeout`,
   aggregate the update vectors with the configured strategy (`federation.strategies.make_strategy`) and apply
   `global += aggregate`.
3. Write `out` (a folder, absent or empty; built in a temp folder and renamed): the final global adapter as
   `adapter_model.safetensors` + `adapter_config.json`, `adapter.gguf` for llama.cpp when the base is known,
   and `summary.json` (per round: members, failures, the metrics members sent, aggregate norm).
"""

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from node.core.fsutil import fsync_dir
from node.fed.flower.app.common import (
    ADAPTER_CONFIG,
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    SUMMARY_FILE,
    UPDATE_KEY,
    AppConfig,
    AppConfigError,
    Tensors,
    finite_or_none,
    flatten,
    read_peft_adapter,
    resolve_base,
    unflatten,
    write_peft_adapter,
)

log = logging.getLogger("flwr.mirador.server")

app = ServerApp()
POLL_S = 0.5  # between pulls of replies (Flower's own send_and_receive sleeps 3 s)


@dataclass(frozen=True)
class GlobalAdapter:
    """The adapter being trained: tensors, peft config (JSON text), LoRA settings, the base folder if known."""

    tensors: Tensors
    adapter_config: str
    targets: str
    rank: int
    alpha: float
    base: Path | None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds and write the final adapter and the summary to `out`."""
    cfg = AppConfig.from_run_config(context.run_config)
    out = Path(cfg.out).expanduser() if cfg.out else None
    if out is not None and out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise AppConfigError(f"out {out} already exists and is not an empty folder")
    adapter = initial_adapter(cfg)
    final, summary = run_rounds(grid, cfg, adapter, run_id=context.run_id)
    if out is not None:
        write_outputs(out, final, adapter, summary)
        log.info("final adapter and summary written to %s", out)


def initial_adapter(cfg: AppConfig) -> GlobalAdapter:
    """The round-1 global adapter (see the module docstring)."""
    from node.training.trainer import TARGET_MODULES

    if cfg.targets not in TARGET_MODULES:
        raise AppConfigError(f"targets must be one of {', '.join(TARGET_MODULES)}, got {cfg.targets!r}")
    if cfg.init_adapter:
        weights = Path(cfg.init_adapter).expanduser()
        tensors = read_peft_adapter(weights)
        config_file = weights.parent / ADAPTER_CONFIG
        if config_file.is_file():
            text = config_file.read_text(encoding="utf-8")
            peft = json.loads(text)
            rank, alpha = int(peft.get("r", cfg.rank)), float(peft.get("lora_alpha", cfg.alpha))
            modules = set(peft.get("target_modules") or TARGET_MODULES[cfg.targets])
            named = [name for name, mods in TARGET_MODULES.items() if set(mods) == modules]
            if not named:
                raise AppConfigError(
                    f"init-adapter targets {sorted(modules)} match none of {', '.join(TARGET_MODULES)}"
                )
            targets = named[0]
        else:
            text, rank, alpha, targets = _lora_config_json(cfg), cfg.rank, cfg.alpha, cfg.targets
        base = Path(cfg.base).expanduser() if cfg.base else None
        return GlobalAdapter(tensors, text, targets, rank, alpha, base)
    import torch
    import transformers
    from peft import get_peft_model, get_peft_model_state_dict

    from node.training.base_model import load_torch_base

    transformers.utils.logging.disable_progress_bar()  # the run's log stays readable

    base = resolve_base(cfg.base, cfg.models)
    model, _ = load_torch_base(base)
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, _lora_config(cfg))
    tensors = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in get_peft_model_state_dict(peft_model).items()}
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.peft_config["default"].save_pretrained(tmp)
        text = (Path(tmp) / ADAPTER_CONFIG).read_text(encoding="utf-8")
    return GlobalAdapter(tensors, text, cfg.targets, cfg.rank, cfg.alpha, base)


def _lora_config(cfg: AppConfig) -> Any:
    """The LoraConfig `node.training.trainer.train_adapter` builds for the same settings."""
    from node.training.trainer import lora_config

    return lora_config(cfg.rank, cfg.alpha, cfg.targets)


def _lora_config_json(cfg: AppConfig) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        _lora_config(cfg).save_pretrained(tmp)
        return (Path(tmp) / ADAPTER_CONFIG).read_text(encoding="utf-8")


def run_rounds(grid: Grid, cfg: AppConfig, adapter: GlobalAdapter, run_id: int = 0) -> tuple[Tensors, dict[str, Any]]:
    """Every round: (the final global adapter's tensors, the JSON-ready summary)."""
    strategy = make_strategy(cfg.strategy)
    names = sorted(adapter.tensors)
    vector = flatten(adapter.tensors)
    initial_digest = _digest(adapter.tensors)
    rounds: list[dict[str, Any]] = []
    for rnd in range(1, cfg.num_rounds + 1):
        began = time.monotonic()
        nodes = wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait)
        sampled = sample_nodes(nodes, cfg.fraction, cfg.min_nodes, random.Random(cfg.seed * 1_000_003 + rnd))
        current = unflatten(vector, adapter.tensors)
        settings = ConfigRecord(
            {
                "server-round": rnd,
                "adapter-config": adapter.adapter_config,
                "targets": adapter.targets,
                "rank": adapter.rank,
                "alpha": adapter.alpha,
            }
        )
        messages = [
            Message(
                RecordDict({ARRAYS_KEY: _array_record(current, names), CONFIG_KEY: settings}),
                node,
                MessageType.TRAIN,
                group_id=str(rnd),
                ttl=cfg.round_timeout,
            )
            for node in sampled
        ]
        log.info("round %d: training on %d of %d nodes", rnd, len(sampled), len(nodes))
        replies = exchange(grid, messages, cfg.round_timeout)
        updates, metrics, failures = _read_replies(replies, vector.size)
        answered = {m.metadata.src_node_id for m in replies}
        failures += [
            {"member": str(n), "reason": "no reply before round-timeout"} for n in sampled if n not in answered
        ]
        needed = max(1, strategy.min_updates)
        if len(updates) < needed:
            raise RuntimeError(f"round {rnd}: {len(updates)} usable updates, {cfg.strategy} needs {needed}: {failures}")
        aggregate = strategy.aggregate(updates)
        vector = (vector.astype(np.float64) + aggregate.vector.astype(np.float64)).astype(np.float32)
        rounds.append(_round_summary(rnd, aggregate, metrics, failures, sampled, time.monotonic() - began))
        log.info("round %d: aggregated %d updates (%s)", rnd, len(aggregate.members), aggregate.strategy)
    final = unflatten(vector, adapter.tensors)
    return final, {
        "run_id": run_id,
        "strategy": strategy.name,
        "num_rounds": cfg.num_rounds,
        "params": int(vector.size),
        "targets": adapter.targets,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "local_steps": cfg.local_steps,
        "clip_norm": cfg.clip_norm,
        "noise_multiplier": cfg.noise_multiplier,
        "initial_sha256": initial_digest,
        "final_sha256": _digest(final),
        "rounds": rounds,
    }


def _array_record(tensors: Tensors, names: Sequence[str]) -> ArrayRecord:
    record = ArrayRecord()
    for name in names:
        record[name] = Array(np.ascontiguousarray(tensors[name]))
    return record


def _read_replies(replies: Sequence[Message], size: int) -> tuple[list[Any], dict[str, Any], list[dict[str, str]]]:
    """(Updates, metrics per member, failures) from the replies of one round."""
    from federation.strategies.base import Update

    updates: list[Any] = []
    metrics: dict[str, Any] = {}
    failures: list[dict[str, str]] = []
    for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):  # a fixed order: reproducible sums
        member = str(msg.metadata.src_node_id)
        if msg.has_error():
            failures.append({"member": member, "reason": str(msg.error.reason)})
            continue
        try:
            update = np.asarray(msg.content.array_records[ARRAYS_KEY][UPDATE_KEY].numpy(), dtype=np.float32)
            reported = dict(msg.content.metric_records[METRICS_KEY])
            if update.shape != (size,) or not np.isfinite(update).all():
                raise ValueError(f"update of shape {update.shape} (expected ({size},)) or not finite")
            updates.append(Update(member, update, 1))  # equal weights: a declared size is neither checked nor private
        except (KeyError, ValueError, TypeError) as exc:
            failures.append({"member": member, "reason": f"unusable reply: {exc}"})
            continue
        metrics[member] = {k: _jsonable(v) for k, v in reported.items()}
    return updates, metrics, failures


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _round_summary(
    rnd: int, aggregate: Any, metrics: dict[str, Any], failures: list[dict[str, str]], sampled: list[int], secs: float
) -> dict[str, Any]:
    """One round's record in summary.json (members' metrics are only what they chose to send)."""
    members = list(aggregate.members)
    return {
        "round": rnd,
        "sampled": [str(n) for n in sampled],
        "members": members,
        "failures": failures,
        "metrics": {m: metrics[m] for m in members if m in metrics},
        "aggregate_norm": finite_or_none(float(np.linalg.norm(np.asarray(aggregate.vector, dtype=np.float64)))),
        "seconds": round(secs, 3),
    }


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    """The connected SuperNodes once there are at least `min_nodes`; RuntimeError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes:
            return nodes
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"only {len(nodes)} SuperNodes connected after {timeout:.0f} s, min-nodes is {min_nodes}"
            )
        time.sleep(POLL_S)


def sample_nodes(nodes: Sequence[int], fraction: float, min_nodes: int, rng: random.Random) -> list[int]:
    """`fraction` of the nodes (rounded down), at least `min_nodes`, at most all of them, sorted."""
    k = min(len(nodes), max(min_nodes, math.floor(len(nodes) * fraction)))
    return sorted(rng.sample(list(nodes), k))


def exchange(grid: Grid, messages: Sequence[Message], timeout: float) -> list[Message]:
    """Push the messages and pull their replies until all arrived or `timeout` seconds passed."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(POLL_S)
    return replies


def make_strategy(name: str) -> Any:
    """The aggregation strategy `name` from `federation.strategies` (the P2P aggregator's own rules)."""
    from federation.strategies import make_strategy as shared

    return shared(name)


def _digest(tensors: Tensors) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(np.ascontiguousarray(tensors[k], dtype=np.float32).tobytes())
    return h.hexdigest()


def write_outputs(out: Path, final: Tensors, adapter: GlobalAdapter, summary: dict[str, Any]) -> None:
    """The final adapter (peft files, GGUF when the base is known) and summary.json, atomically into `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write_peft_adapter(tmp, final, adapter.adapter_config)
        if adapter.base is not None and (adapter.base / "config.json").is_file():
            from node.training.lora_export import LoraShape, write_gguf_lora

            base_config = json.loads((adapter.base / "config.json").read_text(encoding="utf-8"))
            shape = LoraShape(base_config["num_attention_heads"], base_config["num_key_value_heads"], adapter.alpha)
            write_gguf_lora(tmp / "adapter.gguf", final, shape, permute_qk=True)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out.is_dir():
            out.rmdir()  # empty (checked before the run)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
