"""The node side of a federated round's adapter: the round-1 global LoRA, installing a global adapter, local training.

Everything here is numpy and files; torch runs only inside the training subprocess (`python -m node.training.job`,
at nice 19, through `node.training.runner.run_training`). Tensors are peft's state dict of a LoRA on the torch twin of
the served GGUF: `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight` (r x in) and
`.lora_B.weight` (out x r), float32. The round-1 adapter is computed here rather than by peft so that every member
derives the same tensors from the federation's seed alone: lora_A drawn like peft's default initialisation
(kaiming-uniform with a = sqrt(5), i.e. uniform in +-1/sqrt(in)) from a generator keyed by sha256(seed, tensor name),
lora_B zero (so the adapter starts as the identity). A local training run starts from the global tensors, and its
trained tensors are returned, never installed: only an aggregated global adapter is installed (`install_global`).
"""

import functools
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from federation.descriptor import LocalDpSgd
from federation.update import Layout
from node.adapters.check import BaseDims, base_dims_of_file, check_adapter_file
from node.adapters.store import EXTRA_FILES, GGUF_FILE, TRAINING_FILE, AdapterStore, AdapterVersion
from node.core.fsutil import atomic_write_text, fsync_dir, remove_stale
from node.core.home import NodeHome
from node.training.lora_export import GGUF_NAMES, LoraShape, write_gguf_lora
from node.training.runner import TrainRun, run_folder, run_training
from node.training.trainer import TARGET_MODULES

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
INIT_SCHEMA = "mirador.fed-init/v1"  # domain separator of the round-1 seed derivation; changing it changes the init
ARCHITECTURE = "llama"  # the peft naming and the GGUF export (q/k row permutation) are those of Llama
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# settings train_locally fixes itself; the rest of TrainConfig (batch_size, max_length, ...) may be given as options
_FIXED_OPTIONS = frozenset(
    {"targets", "steps", "rank", "alpha", "seed", "split_seed", "dp", "init_adapter", "freeze_a", "merge_adapter"}
)
_LOG_TAIL_LINES = 20
RUN_PREFIX = "fed-"  # run ids (and scratch folders under train/) of federation rounds; user runs never start so


class LocalTrainingError(RuntimeError):
    """The local training job failed; the message is the job's own error."""


class LocalTrainingStopped(LocalTrainingError):
    """The local training job was stopped (the `stop` event was set) before it finished."""


@dataclass(frozen=True)
class RoundDpSgd:
    """DP-SGD at a federation's parameters (example-level modes): noise z and per-example clip C from the
    descriptor, this node's Poisson sample rate q, accounted at δ before the run."""

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    delta: float


def round_sample_rate(data: Path, options: Mapping[str, Any] | None = None) -> float:
    """The Poisson sample rate of this node's DP-SGD rounds: its batch size (DP_BATCH_SIZE unless its options name
    one) over its training examples (the held-out ones excluded), at most 1."""
    from node.training.data import load_examples
    from node.training.trainer import DP_BATCH_SIZE, TrainConfig, split_examples

    given = {k: v for k, v in (options or {}).items() if k in ("batch_size", "holdout_fraction")}
    config = TrainConfig(**{"batch_size": DP_BATCH_SIZE, **given})
    train, _ = split_examples(load_examples(data), config)
    return min(1.0, config.batch_size / len(train))


@dataclass(frozen=True)
class LocalResult:
    """What one local training run produced: the trained peft tensors and the facts from its training.json."""

    tensors: dict[str, np.ndarray]
    examples: int  # training examples (the held-out ones excluded)
    heldout_loss_before: float  # NaN when the job could not measure it
    heldout_loss_after: float
    epsilon: float | None  # DP-SGD epsilon spent by this run (None without local DP-SGD)
    noise_multiplier: float | None
    sample_rate: float
    steps: int
    seconds: float


def targets_key(targets: Sequence[str]) -> str:
    """The TrainConfig `targets` key whose TARGET_MODULES are exactly these module names (in any order)."""
    wanted = sorted(targets)
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"LoRA targets {list(targets)} name a module twice")
    for key, modules in TARGET_MODULES.items():
        if sorted(modules) == wanted:
            return key
    known = "; ".join(f"{key}: {', '.join(sorted(modules))}" for key, modules in TARGET_MODULES.items())
    raise ValueError(f"LoRA targets {wanted} are not a module set the trainer supports ({known})")


def adapter_shapes(dims: BaseDims, rank: int, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{peft tensor name: shape} of a rank-`rank` LoRA on `targets` for the base `dims` (as peft creates it)."""
    if dims.architecture != ARCHITECTURE:
        raise ValueError(f"federated adapters need a {ARCHITECTURE} base model; this one is {dims.architecture!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    modules = TARGET_MODULES[targets_key(targets)]
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(dims.n_layer):
        for module in modules:
            out_features, in_features = dims.matrix(GGUF_NAMES[module])
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if module in _ATTENTION else 'mlp'}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, in_features)
            shapes[f"{prefix}.lora_B.weight"] = (out_features, rank)
    return shapes


def adapter_layout(gguf: Path, rank: int, targets: Sequence[str]) -> Layout:
    """The federation.update Layout of a rank-`rank` LoRA on `targets` for the base model file `gguf`."""
    shapes = adapter_shapes(base_dims(gguf), rank, targets)
    return Layout(tuple((name, shapes[name]) for name in sorted(shapes)))


def base_dims(gguf: Path) -> BaseDims:
    """BaseDims of the base model file `gguf`, cached per file identity (reading the GGUF header takes seconds)."""
    st = gguf.stat()
    return _dims_of(str(gguf.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _dims_of(path: str, inode: int, size: int, mtime_ns: int) -> BaseDims:
    return base_dims_of_file(Path(path))


def _tensor_rng(seed: str | int, name: str) -> np.random.Generator:
    """The generator of one tensor: keyed by sha256(schema, seed, name), so independent of order and platform."""
    digest = hashlib.sha256(f"{INIT_SCHEMA}\0{seed}\0{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def initial_adapter(
    gguf: Path, rank: int, alpha: float, targets: Sequence[str], seed: str | int
) -> dict[str, np.ndarray]:
    """The round-1 global LoRA: identical on every node for the same inputs (lora_A peft-like uniform, lora_B zero)."""
    _check_alpha(alpha)  # alpha does not enter the tensors, but a bad one would only fail later, at export
    if not isinstance(seed, str | int) or isinstance(seed, bool):
        raise ValueError(f"seed must be a string or an integer, got {seed!r}")
    shapes = adapter_shapes(base_dims(gguf), rank, targets)
    tensors: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".lora_A.weight"):
            bound = 1.0 / math.sqrt(shape[1])  # peft: kaiming_uniform_(a=sqrt(5)) on (r, in) is U(+-1/sqrt(in))
            tensors[name] = _tensor_rng(seed, name).uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            tensors[name] = np.zeros(shape, dtype=np.float32)
    return tensors


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")


def _checked_tensors(
    tensors: Mapping[str, np.ndarray], dims: BaseDims, rank: int, targets: Sequence[str]
) -> dict[str, np.ndarray]:
    """`tensors` as contiguous float32 arrays; ValueError unless they are exactly the LoRA's names and finite shapes."""
    shapes = adapter_shapes(dims, rank, targets)
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise ValueError(
            f"the tensors do not fit a rank-{rank} LoRA on {sorted(targets)}: missing {missing[:3]} "
            f"({len(missing)} in all), unexpected {extra[:3]} ({len(extra)} in all)"
        )
    out: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        array = np.ascontiguousarray(np.asarray(tensors[name], dtype=np.float32))
        if array.shape != shapes[name]:
            raise ValueError(
                f"tensor {name} has shape {array.shape}; a rank-{rank} LoRA on {sorted(targets)} needs {shapes[name]}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"tensor {name} holds NaN or infinite values")
        out[name] = array
    return out


def peft_config(rank: int, alpha: float, targets: Sequence[str]) -> dict[str, Any]:
    """The adapter_config.json content peft writes for the trainer's LoraConfig with these settings."""
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": None,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": float(alpha),
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(TARGET_MODULES[targets_key(targets)]),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def write_adapter_folder(
    folder: Path, tensors: Mapping[str, np.ndarray], gguf: Path, rank: int, alpha: float, targets: Sequence[str]
) -> None:
    """Write adapter_model.safetensors, adapter_config.json and adapter.gguf into `folder` (absent/empty) atomically."""
    _check_alpha(alpha)
    dims = base_dims(gguf)
    state = _checked_tensors(tensors, dims, rank, targets)
    if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
        raise FileExistsError(f"{folder} already exists and is not an empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        safetensors.numpy.save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})  # as peft saves it
        with open(tmp / WEIGHTS_FILE, "rb+") as f:
            os.fsync(f.fileno())
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(peft_config(rank, alpha, targets), indent=2, sort_keys=True))
        write_gguf_lora(tmp / GGUF_FILE, state, LoraShape(dims.n_head, dims.n_head_kv, alpha=float(alpha)))
        check_adapter_file(tmp / GGUF_FILE, dims)
        tmp.chmod(0o755)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(folder.parent)


def install_global(
    store: AdapterStore,
    name: str,
    tensors: Mapping[str, np.ndarray],
    gguf: Path,
    rank: int,
    alpha: float,
    targets: Sequence[str],
) -> AdapterVersion:
    """Install a global adapter as the next version of `name` (a running daemon serves it from the next request)."""
    store.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=store.root, prefix=".fed-"))  # hidden: never listed as an adapter name
    try:
        folder = tmp / "adapter"
        write_adapter_folder(folder, tensors, gguf, rank, alpha, targets)
        extras = [folder / n for n in EXTRA_FILES if (folder / n).is_file()]
        return store.install(name, folder / GGUF_FILE, extras)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_peft_tensors(folder: Path) -> dict[str, np.ndarray]:
    """The float32 tensors of the adapter_model.safetensors in `folder`."""
    return {
        k: v.astype(np.float32, copy=False) for k, v in safetensors.numpy.load_file(str(folder / WEIGHTS_FILE)).items()
    }


class _CapturingStore(AdapterStore):
    """Stands in for the adapter store in `run_training`: keeps the trained tensors and facts, installs nothing."""

    def __init__(self) -> None:
        super().__init__(Path(os.devnull), None)
        self.tensors: dict[str, np.ndarray] | None = None
        self.training: dict[str, Any] | None = None

    def install(self, name: str, gguf: Path, extras: list[Path] | None = None) -> AdapterVersion:
        """Read the trained folder (run_training removes it right after); raise ValueError if a file is missing."""
        folder = gguf.parent
        for needed in (WEIGHTS_FILE, TRAINING_FILE):
            if not (folder / needed).is_file():
                raise ValueError(f"the training job wrote no {needed}")
        self.tensors = load_peft_tensors(folder)
        self.training = json.loads((folder / TRAINING_FILE).read_text(encoding="utf-8"))
        return AdapterVersion(name, "local", folder)


def sweep_local_runs(home: NodeHome) -> int:
    """Remove the scratch folders of federation training runs a killed node left behind; returns how many."""
    return remove_stale(home.root / "train", RUN_PREFIX)


def train_locally(
    home: NodeHome,
    gguf: Path,
    global_tensors: Mapping[str, np.ndarray],
    rank: int,
    alpha: float,
    targets: Sequence[str],
    data: Path,
    steps: int,
    seed: int,
    dp_sgd: LocalDpSgd | RoundDpSgd | None,
    stop: threading.Event | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    on_update: Callable[[TrainRun], None] | None = None,
    freeze_a: bool = False,
    under: Mapping[str, np.ndarray] | None = None,
) -> LocalResult:
    """Train the global adapter on local `data` (blocking, training subprocess at nice 19); never installs anything.

    `dp_sgd` turns on DP-SGD for this run: to a target ε (LocalDpSgd), or at a round's z and q (RoundDpSgd: the
    run is checked to have used exactly those); `options` may set the
    other TrainConfig fields (batch_size, max_length, learning_rate, threads, ...); `freeze_a` trains only lora_B
    (FFA-LoRA); `under` (a LoRA of the same shape, e.g. the federation's global) is merged into the base first, so the
    tensors trained are an adapter served together with it (a personal adapter). Raises LocalTrainingError with
    the job's message when it fails, LocalTrainingStopped when `stop` ended it.
    """
    key = targets_key(targets)
    state = _checked_tensors(global_tensors, base_dims(gguf), rank, targets)
    merged = None if under is None else _checked_tensors(under, base_dims(gguf), rank, targets)
    extra = dict(options or {})
    if fixed := sorted(_FIXED_OPTIONS & set(extra)):
        raise ValueError(f"options may not set {', '.join(fixed)}: train_locally sets them from its arguments")
    config: dict[str, Any] = {
        **extra,
        "targets": key,
        "steps": steps,
        "rank": rank,
        "alpha": float(alpha),
        "seed": seed,
        "split_seed": 0,  # the same held-out examples every round: their loss stays comparable across rounds
        "freeze_a": freeze_a,
    }
    if isinstance(dp_sgd, LocalDpSgd):
        config["dp"] = {
            "epsilon": float(dp_sgd.epsilon),
            "delta": float(dp_sgd.delta),
            "max_grad_norm": float(dp_sgd.max_grad_norm),
        }
    elif dp_sgd is not None:
        config["dp"] = asdict(dp_sgd)
    run = TrainRun(id=f"{RUN_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}", adapter="federation")
    folder = run_folder(home, run)
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700)
    capture = _CapturingStore()
    try:
        folder.chmod(0o700)
        init = folder / "global.safetensors"
        safetensors.numpy.save_file(state, str(init), metadata={"format": "pt"})
        config["init_adapter"] = str(init)
        if merged is not None:
            safetensors.numpy.save_file(merged, str(folder / "under.safetensors"), metadata={"format": "pt"})
            config["merge_adapter"] = str(folder / "under.safetensors")
        run_training(run, home, gguf, capture, config, data=data, on_update=on_update, stop=stop)
        if run.status == "stopped":
            raise LocalTrainingStopped(run.error or "local training was stopped")
        if run.status != "done" or capture.tensors is None or capture.training is None:
            raise LocalTrainingError(_failure(run, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if Layout.of(capture.tensors) != Layout.of(state):
        raise LocalTrainingError("the trained adapter's tensors do not have the global adapter's layout")
    facts = capture.training
    if isinstance(dp_sgd, RoundDpSgd):
        used = (facts.get("noise_multiplier"), facts.get("sample_rate"), facts.get("steps"))
        if used != (dp_sgd.noise_multiplier, dp_sgd.sample_rate, steps):
            raise LocalTrainingError(f"the DP-SGD run used (z, q, steps) = {used}, not the accounted {dp_sgd}")
    return LocalResult(
        tensors=capture.tensors,
        examples=int(facts["examples"]),
        heldout_loss_before=_float(facts.get("heldout_loss_before")),
        heldout_loss_after=_float(facts.get("heldout_loss_after")),
        epsilon=facts.get("epsilon"),
        noise_multiplier=facts.get("noise_multiplier"),
        sample_rate=float(facts["sample_rate"]),
        steps=int(facts["steps"]),
        seconds=float(facts["seconds"]),
    )


def _float(value: Any) -> float:
    """A JSON number, or NaN for the null that training.json writes for a non-finite value."""
    return math.nan if value is None else float(value)


def _failure(run: TrainRun, folder: Path) -> str:
    """The job's error; when the job died without saying why, the tail of its log (the folder is about to go)."""
    message = run.error or f"local training ended with status {run.status!r}"
    if run.error is not None and not run.error.endswith("job.log"):  # the job's own message
        return message
    try:
        lines = (folder / "job.log").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return message
    tail = "\n".join(lines[-_LOG_TAIL_LINES:])
    return f"{message}\n--- last lines of the job's log ---\n{tail}" if tail else message
