"""Training jobs started through the API (`POST /v1/train`): one at a time, each in a low-priority subprocess.

The job is driven from a worker thread (node.training.runner); the trio loop only reads its state. When the daemon
stops, a running job is terminated and installs nothing.
"""

import threading
from pathlib import Path
from typing import Any

import trio

from node.adapters.store import AdapterStore
from node.core.home import NodeHome
from node.training.feedback import FeedbackDB, training_records
from node.training.privacy import ledger_account
from node.training.runner import TrainRun, new_run, run_training


class TrainingBusy(Exception):
    """A training job is already running."""


class NothingToLearn(ValueError):
    """`from_feedback` or `from_memory` was asked for, but nothing there qualifies."""


class TrainingService:
    """Starts and tracks training jobs for the daemon."""

    def __init__(self, home: NodeHome, gguf: Path, store: AdapterStore, feedback: FeedbackDB) -> None:
        self.home, self.gguf, self.store, self.feedback = home, gguf, store, feedback
        self.runs: dict[str, TrainRun] = {}
        self._running: TrainRun | None = None
        self._stop = threading.Event()
        self._nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Host training jobs until cancelled; a job still running then is terminated."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                self._stop.set()  # the job's thread terminates its process, then the nursery can close

    def start(
        self,
        adapter: str,
        config: dict[str, Any],
        data: Path | None,
        from_feedback: bool,
        *,
        memory: tuple[str, list[dict[str, Any]]] | None = None,
    ) -> TrainRun:
        """Start a job now (TrainingBusy if one runs; NothingToLearn if feedback or memory yields no example).

        `memory` is (namespace, records) for a run on a namespace's memories (node.memory.training)."""
        if self._running is not None:
            raise TrainingBusy(f"training job {self._running.id} ({self._running.adapter}) is still running")
        if self._nursery is None:
            raise TrainingBusy("the node is not accepting training jobs (starting or stopping)")
        records = training_records(self.feedback.feedback(), adapter) if from_feedback else None
        if from_feedback and not records:
            raise NothingToLearn(
                f"no feedback to learn from for {adapter!r}: rate answers 4-5 or send corrections first"
            )
        provenance = None
        if memory is not None:
            namespace, records = memory
            if not records:
                raise NothingToLearn(f"the memory namespace {namespace!r} holds nothing to learn from")
            provenance = {"memory": namespace}
        run = new_run(adapter)
        self.runs[run.id] = run
        self._running = run
        self._nursery.start_soon(self._drive, run, config, data, records, provenance)
        return run

    async def _drive(
        self,
        run: TrainRun,
        config: dict[str, Any],
        data: Path | None,
        records: list[dict[str, Any]] | None,
        provenance: dict[str, Any] | None,
    ) -> None:
        try:
            account = ledger_account(self.home, data)
            await trio.to_thread.run_sync(
                lambda: run_training(
                    run,
                    self.home,
                    self.gguf,
                    self.store,
                    config,
                    data,
                    records,
                    stop=self._stop,
                    account=account,
                    provenance=provenance,
                ),
                limiter=self._limiter,
            )
        except Exception as exc:  # the runner reports job failures itself; this is a bug or an OS error
            run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            self._running = None

    def status(self) -> dict[str, Any]:
        """Running job and the most recent ones."""
        recent = sorted(self.runs.values(), key=lambda r: r.created)[-5:]
        return {
            "running": self._running.id if self._running else None,
            "recent": [{"id": r.id, "adapter": r.adapter, "status": r.status, "version": r.version} for r in recent],
        }
