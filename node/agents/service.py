"""The daemon's agents: the `@mirador.agent` classes of `MIRADOR_HOME/agents/*.py`, woken by their triggers
(node.agents.triggers), each run bounded in time and isolated from chat (node.tools.userland), their alerts stored
(node.agents.alerts) and emitted as `alert` events (GET /v1/events).

An agent that raises or runs past its time is logged and backs off (10 s doubling up to `[agents] max_backoff_s`);
triggers that arrive while it backs off, while it is disabled or while its previous run is still going are skipped and
counted. `alert` events never wake agents (an agent answering its own alerts would loop)."""

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from node import sdk
from node.agents.alerts import AlertRow, AlertStore
from node.agents.context import AgentContext, CallTool, Complete, Search
from node.agents.events import EventBus
from node.agents.triggers import OnEvent, Schedule, Threshold, Trigger, TriggerError, parse_triggers
from node.core.config import AgentsSection
from node.tools.loader import load_folder
from node.tools.userland import UserCodeTimeout, run_user_code

log = logging.getLogger(__name__)

ALERT_EVENT = "alert"
FIRST_BACKOFF_S = 10.0
MAX_TITLE = 200
MAX_BODY = 8000


class Clock(Protocol):
    """Wall time for schedules (tests drive their own)."""

    def now(self) -> float:
        """Unix time."""
        ...

    async def sleep_until(self, when: float) -> None:
        """Return at unix time `when` (at once if it is past)."""
        ...


class WallClock:
    """The real clock; sleeps in slices of at most a minute, so that a suspended laptop's jump is noticed."""

    def now(self) -> float:
        """Unix time."""
        return time.time()

    async def sleep_until(self, when: float) -> None:
        """Return at unix time `when`."""
        while (left := when - time.time()) > 0:
            await trio.sleep(min(left, 60.0))


@dataclass(frozen=True)
class Runtime:
    """What agents may use: memory search, the model, the tools."""

    search: Search
    complete: Complete
    tool: CallTool


@dataclass
class AgentState:
    """One loaded agent and how its runs went."""

    name: str
    origin: str
    instance: Any
    triggers: list[Trigger]
    timeout_s: float
    enabled: bool = True
    running: bool = False
    runs: int = 0
    failures: int = 0  # in a row
    skipped: int = 0
    backoff_until: float = 0.0
    last_run: float | None = None
    last_error: str | None = None
    next_fire: dict[str, float] = field(default_factory=dict)
    holding: dict[str, bool] = field(default_factory=dict)  # threshold trigger -> whether its condition held

    def summary(self) -> dict[str, Any]:
        """The agent as GET /v1/agents shows it."""
        return {
            "name": self.name,
            "origin": self.origin,
            "triggers": [t.text for t in self.triggers],
            "enabled": self.enabled,
            "running": self.running,
            "runs": self.runs,
            "failures_in_a_row": self.failures,
            "skipped": self.skipped,
            "backoff_until": self.backoff_until or None,
            "last_run": self.last_run,
            "last_error": self.last_error,
            "next_fire": dict(self.next_fire),
        }


def as_alert(result: Any) -> sdk.Alert | None:
    """What `analyze` returned as an Alert (an Alert of strings, a string: its title, or None), cut to the sizes
    kept; TypeError for anything else."""
    if result is None:
        return None
    if isinstance(result, str):
        result = sdk.Alert(result)
    if not isinstance(result, sdk.Alert) or not isinstance(result.title, str) or not isinstance(result.body, str):
        raise TypeError("analyze must return a mirador.Alert (title and body strings), a string or None")
    if not result.title.strip():
        return None
    level = result.level if result.level in ("info", "warning", "critical") else "info"
    return sdk.Alert(result.title[:MAX_TITLE], result.body[:MAX_BODY], level)


class AgentService:
    """Loads the agents, wakes them, runs them, keeps their alerts."""

    def __init__(
        self,
        agents_dir: Path,
        cfg: AgentsSection,
        alerts: AlertStore,
        bus: EventBus,
        runtime: Runtime,
        clock: Clock | None = None,
    ) -> None:
        self.cfg = cfg
        self.alerts = alerts
        self.bus = bus
        self.runtime = runtime
        self.clock: Clock = clock or WallClock()
        self.errors: list[tuple[str, str]] = []
        self.agents: dict[str, AgentState] = {}
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        loaded = load_folder(agents_dir, "agents")
        self.errors += loaded.errors
        switches = alerts.enabled()
        for mark, cls, origin in loaded.agents:
            try:
                triggers = parse_triggers(getattr(cls, "triggers", None))
                if not callable(getattr(cls, "analyze", None)):
                    raise TypeError("an agent needs an `analyze(self, context)` method")
                if mark.name in self.agents:
                    raise TypeError(f"another agent is called {mark.name} ({self.agents[mark.name].origin})")
                instance = cls()
            except (TriggerError, Exception) as exc:
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                self.errors.append((origin, f"agent {mark.name}: {detail}"))
                log.error("%s: agent %s: %s", origin, mark.name, detail)
                continue
            timeout = mark.timeout_s or cfg.timeout_s
            state = AgentState(mark.name, origin, instance, triggers, timeout, enabled=switches.get(mark.name, True))
            self.agents[mark.name] = state

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Wake the agents until cancelled: a task per schedule, the bus for events and thresholds."""
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.bus.on(self._on_event)
            for state in self.agents.values():
                for trigger in state.triggers:
                    if isinstance(trigger, Schedule):
                        nursery.start_soon(self._schedule, state, trigger)
            task_status.started()
            await trio.sleep_forever()

    async def _schedule(self, state: AgentState, trigger: Schedule) -> None:
        while True:
            when = trigger.next_after(self.clock.now())
            state.next_fire[trigger.text] = when
            await self.clock.sleep_until(when)
            self._fire(state, sdk.Event("schedule", {"trigger": trigger.text, "scheduled": when}, self.clock.now()))

    def _on_event(self, event: sdk.Event) -> None:
        if event.name == ALERT_EVENT:
            return
        value = event.data.get("value")
        metric = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        for state in self.agents.values():
            for trigger in state.triggers:
                if isinstance(trigger, OnEvent) and trigger.name == event.name:
                    self._fire(state, event)
                elif isinstance(trigger, Threshold) and trigger.metric == event.name and metric is not None:
                    holds = trigger.holds(metric)
                    crossed = holds and not state.holding.get(trigger.text, False)
                    state.holding[trigger.text] = holds
                    if crossed:
                        data = {"trigger": trigger.text, "metric": trigger.metric, "value": metric, "event": event.data}
                        self._fire(state, sdk.Event("threshold", data, event.at, event.source))

    def _fire(self, state: AgentState, event: sdk.Event) -> None:
        if self._nursery is None:
            return
        if not state.enabled or state.running or self.clock.now() < state.backoff_until:
            state.skipped += 1
            return
        state.running = True
        self._nursery.start_soon(self._run, state, event)

    async def _run(self, state: AgentState, event: sdk.Event) -> AlertRow | None:
        """One run of an agent (state.running already set); its alert, if it made one."""
        assert self._token is not None
        context = AgentContext(
            event, state.name, self._token, self.runtime.search, self.runtime.complete, self.runtime.tool
        )
        state.runs += 1
        state.last_run = self.clock.now()
        try:
            alert = as_alert(await run_user_code(state.instance.analyze, (context,), {}, state.timeout_s))
        except (UserCodeTimeout, Exception) as exc:
            self._failed(state, exc)
            return None
        finally:
            state.running = False
        state.failures, state.last_error = 0, None
        if alert is None:
            return None
        try:  # never let a run's end reach the daemon's nursery: a full disk, a locked state.db
            row = await trio.to_thread.run_sync(
                self.alerts.add, state.name, alert.title, alert.body, alert.level, event.name, event.data
            )
        except Exception as exc:
            log.exception("agent %s: its alert could not be stored", state.name)
            state.last_error = f"its alert could not be stored: {exc}"
            return None
        self.bus.emit(ALERT_EVENT, row.as_dict(), source=f"agent:{state.name}")
        return row

    def _failed(self, state: AgentState, exc: BaseException) -> None:
        state.failures += 1
        wait = min(self.cfg.max_backoff_s, FIRST_BACKOFF_S * 2 ** (state.failures - 1))
        state.backoff_until = self.clock.now() + wait
        state.last_error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        if isinstance(exc, UserCodeTimeout):
            log.warning("agent %s: %s; next run in %.0f s at the earliest", state.name, exc, wait)
        else:
            log.error(
                "agent %s failed; next run in %.0f s at the earliest",
                state.name,
                wait,
                exc_info=(type(exc), exc, exc.__traceback__),
            )

    def get(self, name: str) -> AgentState:
        """The agent called `name`; KeyError if none."""
        return self.agents[name]

    def set_enabled(self, name: str, enabled: bool) -> AgentState:
        """Turn an agent on or off (kept in state.db); turning it on clears its back-off."""
        state = self.agents[name]
        self.alerts.set_enabled(name, enabled)
        state.enabled = enabled
        if enabled:
            state.backoff_until, state.failures = 0.0, 0
        return state

    async def run_now(self, name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run an agent once, now (`mirador agents run`), disabled or backing off or not; what came of it."""
        state = self.agents[name]
        if state.running:
            return {"agent": name, "ran": False, "error": "its previous run is still going"}
        state.running = True
        row = await self._run(state, sdk.Event("manual", dict(data or {}), self.clock.now(), "cli"))
        return {
            "agent": name,
            "ran": True,
            "alert": row.as_dict() if row else None,
            "error": state.last_error,
        }

    def status(self) -> dict[str, Any]:
        """Every agent and what failed to load."""
        return {
            "agents": [s.summary() for s in self.agents.values()],
            "errors": [{"where": where, "error": why} for where, why in self.errors],
        }
