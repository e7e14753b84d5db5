"""The training subprocess: `python -m node.training.job SPEC_JSON_PATH`.

Spec (JSON, strict): {"gguf": path, "models_dir": path, "data": path | null, "examples": jsonl path | null,
"evaluate": data path | null (examples only evaluated, before and after, never trained on),
"config": {TrainConfig fields; "dp": {"epsilon" | "noise_multiplier" + "sample_rate", "delta", "max_grad_norm"} |
null}, "out_dir": path}.

Stdout carries only JSON lines, one per event, flushed: `started`, `dequantizing` (only when the torch twin of the
GGUF is not cached yet), `progress` (once per step), then `done` (with the TrainResult) or `error`. Everything else
(logs, warnings, progress bars, C libraries) goes to stderr. Exit codes: 0 done, 2 bad spec or data (the message
names the file and line), 1 any other failure, 143 on SIGTERM. The adapter is built in a temp folder next to
out_dir and renamed into place at the end: a failed run leaves out_dir absent.
"""

import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import msgspec

from node.training.data import DataError, Example, load_examples

log = logging.getLogger("mirador.training.job")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class _DPSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    sample_rate: float | None = None


class _ConfigSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    targets: str | msgspec.UnsetType = msgspec.UNSET
    steps: int | msgspec.UnsetType = msgspec.UNSET
    rank: int | msgspec.UnsetType = msgspec.UNSET
    alpha: float | msgspec.UnsetType = msgspec.UNSET
    learning_rate: float | msgspec.UnsetType = msgspec.UNSET
    batch_size: int | msgspec.UnsetType = msgspec.UNSET
    max_length: int | msgspec.UnsetType = msgspec.UNSET
    seed: int | msgspec.UnsetType = msgspec.UNSET
    split_seed: int | msgspec.UnsetType = msgspec.UNSET
    holdout_fraction: float | msgspec.UnsetType = msgspec.UNSET
    dp: _DPSpec | msgspec.UnsetType | None = msgspec.UNSET
    threads: int | msgspec.UnsetType | None = msgspec.UNSET
    physical_batch_size: int | msgspec.UnsetType | None = msgspec.UNSET
    init_adapter: str | msgspec.UnsetType | None = msgspec.UNSET
    freeze_a: bool | msgspec.UnsetType = msgspec.UNSET
    merge_adapter: str | msgspec.UnsetType | None = msgspec.UNSET
    anchor_samples: int | msgspec.UnsetType = msgspec.UNSET
    anchor_weight: float | msgspec.UnsetType = msgspec.UNSET


class JobSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The validated job spec."""

    gguf: str
    models_dir: str
    out_dir: str
    data: str | None = None
    examples: str | None = None
    evaluate: str | None = None
    config: _ConfigSpec = _ConfigSpec()


class SpecError(ValueError):
    """The spec file is unusable."""


def read_spec(path: Path) -> JobSpec:
    """Parse and validate a spec file; SpecError names the file and the bad key."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror or exc}") from None
    try:
        spec = msgspec.json.decode(raw, type=JobSpec)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        reason, _, where = msg.partition(" - at `$")
        key = where.rstrip("`").lstrip(".")
        raise SpecError(f"{path}: {key + ': ' if key else ''}{reason}") from None
    except msgspec.DecodeError as exc:
        raise SpecError(f"{path}: invalid JSON ({exc})") from None
    if spec.data is None and spec.examples is None:
        raise SpecError(f"{path}: give 'data' or 'examples' (or both)")
    return spec


def train_config(spec: JobSpec) -> Any:
    """The TrainConfig the spec asks for (defaults for unset fields; ValueError names a bad field)."""
    from node.training.trainer import DPConfig, config_with_defaults

    given = {f: getattr(spec.config, f) for f in spec.config.__struct_fields__}
    kwargs = {k: v for k, v in given.items() if not isinstance(v, msgspec.UnsetType)}
    dp = kwargs.get("dp")
    if isinstance(dp, _DPSpec):
        kwargs["dp"] = DPConfig(**msgspec.structs.asdict(dp))
    return config_with_defaults(**kwargs)


class _Events:
    """JSON lines on the real stdout (fd 1 is pointed at stderr so that nothing else reaches it)."""

    def __init__(self) -> None:
        self._out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def emit(self, event: str, **fields: Any) -> None:
        """Write one event line and flush it."""
        self._out.write(json.dumps({"event": event, **_finite(fields)}, allow_nan=False) + "\n")
        self._out.flush()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def run_job(spec_path: Path, events: _Events) -> None:
    """Validate the spec and data, prepare the torch base, train into a temp folder, rename it to out_dir."""
    from node.training.base_model import CACHE_MARKER, ensure_torch_base, torch_base_dir
    from node.training.trainer import train_adapter

    spec = read_spec(spec_path)
    config = train_config(spec)
    examples: list[Example] = []
    for source in (spec.data, spec.examples):
        if source is not None:
            examples += load_examples(Path(source))
    evaluate = load_examples(Path(spec.evaluate)) if spec.evaluate is not None else []
    out_dir = Path(spec.out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise SpecError(f"{spec_path}: out_dir {out_dir} already exists")
    gguf, models_dir = Path(spec.gguf), Path(spec.models_dir)
    if not gguf.is_file():
        raise SpecError(f"{spec_path}: gguf {gguf} is not a file")
    events.emit("started", pid=os.getpid(), examples=len(examples), steps=config.steps, out_dir=str(out_dir))
    if not (torch_base_dir(models_dir, gguf) / CACHE_MARKER).is_file():
        log.info("one-time dequantization of %s into a torch model (about 15-30 s)", gguf.name)
        events.emit("dequantizing", gguf=str(gguf))
    import transformers

    transformers.utils.logging.disable_progress_bar()  # stderr stays readable in the daemon's log
    base = ensure_torch_base(models_dir, gguf)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        result = train_adapter(base, examples, config, tmp, lambda p: events.emit("progress", **asdict(p)), evaluate)
        tmp.chmod(0o755)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dir_fd = os.open(out_dir.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    events.emit("done", result=asdict(result), out_dir=str(out_dir))


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def die_with_parent() -> None:
    """On Linux, get SIGTERM when the node that started this job dies (a killed node leaves no orphan training)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); this job outlives a killed node", ctypes.get_errno())
    elif parent == 1 or os.getppid() != parent:  # the node died before the request took effect
        raise SystemExit(128 + signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 done, 2 bad spec or data, 1 other failure)."""
    events = _Events()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        events.emit("error", message="usage: python -m node.training.job SPEC_JSON_PATH")
        return 2
    try:
        run_job(Path(args[0]), events)
    except (DataError, ValueError) as exc:
        events.emit("error", message=str(exc))
        return 2
    except SystemExit as exc:
        events.emit("error", message=f"terminated (exit {exc.code})")
        return int(exc.code) if isinstance(exc.code, int) else 1
    except BaseException as exc:
        log.exception("training failed")
        events.emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    die_with_parent()
    sys.exit(main())
