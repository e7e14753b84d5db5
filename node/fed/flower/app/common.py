"""What the ClientApp and the ServerApp share: the run config, adapter tensors <-> flat vectors, peft files.

A global adapter travels as an `ArrayRecord` of peft's state-dict tensors (name -> numpy array, serialized by
Flower with `np.save(allow_pickle=False)`); an update travels as one flat float32 vector `new - global`, the
tensors concatenated in sorted-name order (`flatten`), which is the form the strategies and the DP code take.
"""

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Tensors = dict[str, npt.NDArray[np.float32]]
Vector = npt.NDArray[np.float32]

ARRAYS_KEY = "arrays"  # RecordDict key of the ArrayRecord (global adapter down, update up)
CONFIG_KEY = "config"  # RecordDict key of the ConfigRecord sent with a train message
METRICS_KEY = "metrics"  # RecordDict key of the MetricRecord of a reply
UPDATE_KEY = "update"  # the one array in a reply's ArrayRecord
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SUMMARY_FILE = "summary.json"


class AppConfigError(ValueError):
    """A run-config or node-config value is missing or has the wrong type."""


@dataclass(frozen=True)
class AppConfig:
    """The run config (`[tool.flwr.app.config]` in this folder's pyproject.toml, overridable by `flwr run -c`).

    Keys are the field names with `-` for `_`. Paths (`out`, `base`, `models`, `init-adapter`) are paths on the
    SuperLink's machine; an empty string means "not given".
    """

    num_rounds: int = 3
    min_nodes: int = 2  # the ServerApp waits (up to node_wait s) until this many SuperNodes are connected
    fraction: float = 1.0  # share of the connected nodes sampled per round (at least min_nodes)
    strategy: str = "fedavg"
    local_steps: int = 5
    rank: int = 8
    alpha: float = 16.0
    targets: str = "qv"
    learning_rate: float = 2e-3
    batch_size: int = 4
    max_length: int = 128
    seed: int = 0
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5  # the δ members account their releases at
    epsilon_budget: float = 8.0  # ε a member may spend in this run (its node's [privacy] limits apply too)
    threads: int = 0  # torch threads per ClientApp; 0 = every core
    round_timeout: float = 600.0
    node_wait: float = 120.0
    out: str = ""
    base: str = ""
    models: str = ""
    init_adapter: str = ""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "AppConfig":
        """Defaults overridden by the run config's keys; unknown keys are ignored; AppConfigError names a bad key."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in run_config:
                values[f.name] = _coerce(key, run_config[key], type(getattr(cls, f.name)))
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Refuse values no run can use."""
        for name in ("num_rounds", "min_nodes", "local_steps", "rank", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise AppConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.fraction <= 1:
            raise AppConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if not self.clip_norm > 0:
            raise AppConfigError(f"clip-norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise AppConfigError(f"noise-multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise AppConfigError(f"delta must be in (0, 1), got {self.delta}")
        if not self.epsilon_budget > 0:
            raise AppConfigError(f"epsilon-budget must be > 0, got {self.epsilon_budget}")
        if self.threads < 0 or self.seed < 0:
            raise AppConfigError("threads and seed must be >= 0")
        for name in ("round_timeout", "node_wait", "alpha", "learning_rate"):
            if not getattr(self, name) > 0:
                raise AppConfigError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """`value` as `kind` (TOML gives ints for whole floats); AppConfigError otherwise."""
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise AppConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise AppConfigError(f"{key} must be {kind.__name__}, got {value!r}")


def flatten(tensors: Mapping[str, np.ndarray]) -> Vector:
    """The tensors as one float32 vector, in sorted-name order."""
    if not tensors:
        raise ValueError("no tensors to flatten")
    return np.concatenate([np.asarray(tensors[k], dtype=np.float32).ravel() for k in sorted(tensors)])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> Tensors:
    """Split a flat vector back into tensors shaped like `like` (sorted-name order); ValueError on a size mismatch."""
    total = sum(int(np.prod(like[k].shape)) for k in like)
    if vector.ndim != 1 or vector.size != total:
        raise ValueError(f"vector of shape {vector.shape} does not fit {len(like)} tensors of {total} values")
    out: Tensors = {}
    at = 0
    for k in sorted(like):
        n = int(np.prod(like[k].shape))
        out[k] = np.asarray(vector[at : at + n], dtype=np.float32).reshape(like[k].shape).copy()
        at += n
    return out


def write_peft_adapter(folder: Path, tensors: Mapping[str, np.ndarray], adapter_config: str) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (peft's layout) into folder; return the weights."""
    from safetensors.numpy import save_file

    json.loads(adapter_config)  # refuse a config that is not JSON before writing anything
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / ADAPTER_WEIGHTS
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(weights))
    (folder / ADAPTER_CONFIG).write_text(adapter_config, encoding="utf-8")
    return weights


def read_peft_adapter(weights: Path) -> Tensors:
    """The tensors of a peft `adapter_model.safetensors`, as float32."""
    from safetensors.numpy import load_file

    return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(weights)).items()}


def resolve_base(base: str, models: str) -> Path:
    """The torch twin of the embedded GGUF: `base` if given, else built (once, cached) under `models`, else under
    the node home's models folder (`$MIRADOR_HOME/models`)."""
    if base:
        folder = Path(base).expanduser()
        if not folder.is_dir():
            raise AppConfigError(f"base {folder} is not a folder")
        return folder
    from node.core.home import NodeHome
    from node.inference.models import embedded_model_path
    from node.training.base_model import ensure_torch_base

    models_dir = Path(models).expanduser() if models else NodeHome.from_env().models_dir
    return ensure_torch_base(models_dir, embedded_model_path())


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: None instead."""
    return value if math.isfinite(value) else None


def torch_threads(threads: int) -> int:
    """Threads for torch: the configured number, else every core."""
    return threads or os.cpu_count() or 1
