"""Run one training job (`python -m node.training.job`) as a low-priority subprocess and install its adapter.

Shared by `mirador train` (foreground, progress bar) and the daemon (`POST /v1/train`, in a worker thread). The
job folder `MIRADOR_HOME/train/<id>/` keeps the spec, the examples drawn from feedback, the job's log and a
`status.json` kept current; the trained adapter goes into the adapter store as the next version of its name, so a
running daemon serves it from the next request. A failed or stopped job installs nothing.

The subprocess runs at nice 19: on a small machine torch and llama.cpp share the cores, and llama.cpp's OpenMP
threads stall badly when preempted (measured: a 12-token answer took 50 s beside an un-niced training run).
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node.adapters.store import EXTRA_FILES, PROVENANCE_FILE, AdapterStore
from node.core.fsutil import atomic_write_text
from node.core.home import NodeHome

TRAIN_NICE = 19


@dataclass
class TrainRun:
    """The state of one training job, as reported by `GET /v1/train/{id}` and `status.json`."""

    id: str
    adapter: str
    status: str = "queued"  # queued | dequantizing | running | done | failed | stopped
    step: int = 0
    steps: int = 0
    loss: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    examples: int | None = None
    version: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def new_run(adapter: str) -> TrainRun:
    """A fresh run id for `adapter`."""
    return TrainRun(id=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", adapter=adapter)


def run_folder(home: NodeHome, run: TrainRun) -> Path:
    """Where a run keeps its spec, log and status."""
    return home.root / "train" / run.id


def run_training(
    run: TrainRun,
    home: NodeHome,
    gguf: Path,
    store: AdapterStore,
    config: dict[str, Any],
    data: Path | None = None,
    records: list[dict[str, Any]] | None = None,
    on_update: Callable[[TrainRun], None] | None = None,
    stop: threading.Event | None = None,
    account: Callable[[TrainRun, Mapping[str, Any]], None] | None = None,
    provenance: Mapping[str, Any] | None = None,
    evaluate: list[dict[str, Any]] | None = None,
) -> TrainRun:
    """Train (blocking), install the adapter on success; `run` is updated in place at every event. `account` is
    called with the training result before the install (the privacy ledger): if it raises, nothing is installed.
    `provenance` is installed with the adapter as provenance.json (what it was trained on). `evaluate`: records
    whose loss the result reports before and after (eval_loss_*), never trained on."""
    folder = run_folder(home, run)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "gguf": str(gguf),
        "models_dir": str(home.models_dir),
        "data": str(data) if data else None,
        "examples": None,
        "evaluate": None,
        "config": config,
        "out_dir": str(folder / "adapter"),
    }
    for key, given in (("examples", records), ("evaluate", evaluate)):
        if given:
            path = folder / f"{key}.jsonl"
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in given), 0o600)
            spec[key] = str(path)
    atomic_write_text(folder / "spec.json", json.dumps(spec, indent=2), 0o600)

    def update(**changes: Any) -> None:
        for key, value in changes.items():
            setattr(run, key, value)
        atomic_write_text(folder / "status.json", json.dumps(run.to_json(), indent=2), 0o600)
        if on_update is not None:
            on_update(run)

    update(status="running")
    with open(folder / "job.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.training.job", str(folder / "spec.json")],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    # lowered at once, long before Python has started torch's threads (which inherit it); no preexec_fn, which
    # is unsafe in the threaded daemon
    os.setpriority(os.PRIO_PROCESS, proc.pid, TRAIN_NICE)
    watcher = _stop_watcher(proc, stop)
    last: dict[str, Any] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        last = event
        kind = event.get("event")
        if kind == "started":
            update(examples=event.get("examples"), steps=event.get("steps", run.steps))
        elif kind == "dequantizing":
            update(status="dequantizing")
        elif kind == "progress":
            update(
                status="running",
                step=event["step"],
                steps=event["steps"],
                loss=event.get("loss"),
                elapsed_s=event.get("elapsed_s", 0.0),
                eta_s=event.get("eta_s"),
            )
    code = proc.wait()
    if watcher is not None:
        watcher.set()
    if stop is not None and stop.is_set() and code != 0:
        update(status="stopped", error="the node stopped while training; nothing was installed")
        return run
    if code != 0 or last.get("event") != "done":
        message = last.get("message") if last.get("event") == "error" else None
        update(status="failed", error=message or f"the training process exited with code {code}; see {log.name}")
        return run
    out = Path(spec["out_dir"])
    if account is not None:
        try:
            account(run, last.get("result") or {})
        except Exception as exc:  # an adapter whose spend is not in the ledger must not serve
            update(status="failed", error=f"the run could not be recorded in the privacy ledger: {exc}")
            return run
    if provenance is not None:
        atomic_write_text(out / PROVENANCE_FILE, json.dumps(dict(provenance), indent=2) + "\n", 0o600)
    try:
        installed = store.install(
            run.adapter, out / "adapter.gguf", [out / n for n in EXTRA_FILES if (out / n).exists()]
        )
    except ValueError as exc:  # AdapterRejected: the export is refused by the same checks as any adapter
        update(status="failed", error=f"the trained adapter was refused: {exc}")
        return run
    shutil.rmtree(out, ignore_errors=True)  # the store holds its own copy
    update(status="done", version=installed.version, result=last.get("result"), eta_s=0.0)
    return run


def _stop_watcher(proc: "subprocess.Popen[bytes]", stop: threading.Event | None) -> threading.Event | None:
    """Terminate `proc` once `stop` is set; returns an event that ends the watcher."""
    if stop is None:
        return None
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if stop.wait(0.2):
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                return

    threading.Thread(target=watch, name="mirador-train-stop", daemon=True).start()
    return done
