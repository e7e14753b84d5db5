"""The ClientApp: one federated member's local round, the same trainer and privacy code as the P2P path.

A `train` message carries the global adapter (`arrays`: peft tensor name -> array) and the LoRA settings
(`config`). The member writes the global adapter as a peft folder, trains `local-steps` steps from it on this
SuperNode's data with `node.training.trainer.train_adapter`, and replies with the update `new - global` as one
flat float32 vector (`arrays["update"]`), privatized when `noise-multiplier > 0` (clip to `clip-norm`, add
Gaussian noise of std `noise-multiplier x clip-norm`), plus metrics.

What leaves the member is the (privatized) update and the privacy settings it was released under (`clip-norm`,
`noise-multiplier`, `privatized`): nothing the ledger does not cover. The raw update norm, the training and held-out
losses and the dataset size stay in this SuperNode's log; the training time is sent only when the node's own
config says `report-timings = true` (for benchmarks on one's own machines: it grows with the data file's size).

Every round is accounted in the node's privacy ledger under its `[privacy]` policy before training and recorded
before the reply (`node.fed.flower.app.ledger`): a round the policy or a budget refuses raises, and the ServerApp
counts a failure for this node.

Node config (`flower-supernode --node-config`, see `node.fed.flower.engine.start_supernode`):
`data` (required: a `.txt` or `.jsonl` training file on this machine), `home` (the Mirador home whose `node.toml`
policy and `state.db` ledger apply; default `$MIRADOR_HOME` or ~/.mirador), `superlink` (the address, part of the
run's ledger key), `base` (a torch twin folder) or `models` (where to build it from the embedded GGUF once; default
`$MIRADOR_HOME/models`), `report-timings`.
"""

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from node.core.home import NodeHome
from node.fed.flower.app.common import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    UPDATE_KEY,
    AppConfig,
    AppConfigError,
    Tensors,
    Vector,
    flatten,
    read_peft_adapter,
    resolve_base,
    torch_threads,
    write_peft_adapter,
)
from node.fed.flower.app.ledger import check_round, open_account, record_round

log = logging.getLogger("flwr.mirador.client")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train from the global adapter on this node's data; reply with the (privatized) update and metrics."""
    cfg = AppConfig.from_run_config(context.run_config)
    settings = msg.content.config_records[CONFIG_KEY]
    global_tensors: Tensors = {
        k: np.asarray(a.numpy(), dtype=np.float32) for k, a in msg.content.array_records[ARRAYS_KEY].items()
    }
    data = context.node_config.get("data")
    if not isinstance(data, str) or not data:
        raise AppConfigError("this SuperNode has no 'data' in its node config (--node-config data=PATH)")
    data_file = Path(data).expanduser()
    home = NodeHome.from_env(_node_str(context, "home") or None)
    r = int(settings["server-round"])  # type: ignore[arg-type]
    account = open_account(home, data_file, f"{_node_str(context, 'superlink')}/{context.run_id}", cfg)
    check_round(account, r, cfg)  # refused: no reply, the ServerApp counts a failure; nothing was trained
    base = resolve_base(_node_str(context, "base"), _node_str(context, "models"))
    update, metrics, local = train_member(
        base,
        data_file,
        global_tensors,
        adapter_config=str(settings["adapter-config"]),
        targets=str(settings["targets"]),
        rank=int(settings["rank"]),  # type: ignore[arg-type]
        alpha=float(settings["alpha"]),  # type: ignore[arg-type]
        cfg=cfg,
    )
    record_round(account, r, cfg)  # before the update leaves
    log.info("round %s, kept on this node: %s; sent: %s", r, local, metrics)
    if context.node_config.get("report-timings") is True:
        metrics["train-seconds"] = local["train-seconds"]
    reply = RecordDict({ARRAYS_KEY: ArrayRecord({UPDATE_KEY: Array(update)}), METRICS_KEY: MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


def _node_str(context: Context, key: str) -> str:
    value = context.node_config.get(key, "")
    if not isinstance(value, str):
        raise AppConfigError(f"node config {key} must be a string path, got {value!r}")
    return value


def train_member(
    base: Path,
    data: Path,
    global_tensors: Tensors,
    *,
    adapter_config: str,
    targets: str,
    rank: int,
    alpha: float,
    cfg: AppConfig,
    rng: np.random.Generator | None = None,
) -> tuple[Vector, dict[str, Any], dict[str, Any]]:
    """One member's local round: (update vector, metrics to send, figures kept on this node). The update is
    privatized when noise-multiplier > 0."""
    import transformers

    from node.training.data import load_examples
    from node.training.trainer import TrainConfig, train_adapter

    transformers.utils.logging.disable_progress_bar()  # the SuperNode's log stays readable

    examples = load_examples(data)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mirador-flower-") as tmp:
        init = write_peft_adapter(Path(tmp) / "global", global_tensors, adapter_config)
        config = TrainConfig(
            targets=targets,
            steps=cfg.local_steps,
            rank=rank,
            alpha=alpha,
            learning_rate=cfg.learning_rate,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            seed=cfg.seed,
            threads=torch_threads(cfg.threads),
            init_adapter=str(init),
        )
        result = train_adapter(base, examples, config, Path(tmp) / "trained")
        trained = read_peft_adapter(Path(tmp) / "trained" / "adapter_model.safetensors")
    if trained.keys() != global_tensors.keys():
        raise RuntimeError("the trained adapter's tensors differ from the global adapter's")
    update = flatten(trained) - flatten(global_tensors)
    raw_norm = float(np.linalg.norm(update.astype(np.float64)))
    privatized = cfg.noise_multiplier > 0
    if privatized:
        update = privatize(update, cfg.clip_norm, cfg.noise_multiplier, rng or np.random.default_rng())
    metrics: dict[str, Any] = {
        "clip-norm": float(cfg.clip_norm),
        "noise-multiplier": float(cfg.noise_multiplier),
        "privatized": int(privatized),
    }
    local = {
        "examples": len(examples),
        "train-loss": round(float(result.train_loss), 4),
        "heldout-loss": [round(float(result.heldout_loss_before), 4), round(float(result.heldout_loss_after), 4)],
        "update-norm": round(raw_norm, 4),  # of the raw update, before clipping and noise
        "train-seconds": round(time.monotonic() - began, 3),
    }
    return update.astype(np.float32), metrics, local


def privatize(vector: Vector, clip_norm: float, noise_multiplier: float, rng: np.random.Generator) -> Vector:
    """The member-side DP step of the P2P path (`crypto.dp.privatize`): clip to C, add N(0, (z·C)²)."""
    from crypto.dp import privatize as shared

    return np.asarray(shared(vector, clip_norm, noise_multiplier, rng), dtype=np.float32)
