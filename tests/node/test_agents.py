"""Agents (node.agents): schedules under a controlled clock, events, thresholds once per crossing, failures and
hangs contained, alerts kept in state.db — the real AgentService on real agent files, in a trio loop."""

import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from node.agents.alerts import AlertStore
from node.agents.events import EventBus
from node.agents.service import AgentService, Runtime
from node.agents.triggers import OnEvent, Schedule, Threshold, TriggerError, parse_trigger
from node.core.config import AgentsSection


class ControlledClock:
    """The test's wall clock: time moves only when the test sets it."""

    def __init__(self, start: float) -> None:
        self.t = start
        self._moved = trio.Event()

    def now(self) -> float:
        return self.t

    async def sleep_until(self, when: float) -> None:
        while self.t < when:
            moved = self._moved
            await moved.wait()

    def set(self, t: float) -> None:
        self.t = t
        self._moved.set()
        self._moved = trio.Event()


async def _nothing_found(query: str, k: int, namespace: str) -> list[str]:
    return []


async def _no_model(prompt: str, max_tokens: int) -> str:
    raise AssertionError("these agents do not use the model")


async def _echo_tool(name: str, arguments: dict[str, Any]) -> str:
    return f"{name}:{sorted(arguments.items())}"


RUNTIME = Runtime(_nothing_found, _no_model, _echo_tool)


def _agent_file(folder: Path, name: str, source: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


@asynccontextmanager
async def running_agents(
    tmp_path: Path, clock: ControlledClock | None = None, **cfg: Any
) -> AsyncIterator[tuple[AgentService, EventBus]]:
    bus = EventBus()
    bus.bind()
    alerts = AlertStore(tmp_path / "state.db")
    service = AgentService(tmp_path / "agents", AgentsSection(**cfg), alerts, bus, RUNTIME, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service, bus
        nursery.cancel_scope.cancel()
    alerts.close()


async def until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait (real time: agents run in threads) until `check()` holds."""
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)


def alerts_of(service: AgentService) -> list[Any]:
    return list(reversed(service.alerts.recent(100)))


def run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test)


def test_trigger_strings_parse_or_say_what_is_accepted() -> None:
    # Arrange / Act
    daily, every, cron = parse_trigger("daily"), parse_trigger("every:90s"), parse_trigger("*/5 9-17 * * 1-5")
    event, roadmap = parse_trigger("event:memory.added"), parse_trigger("on_transaction")
    threshold = parse_trigger("threshold:balance < 100")
    # Assert
    assert isinstance(daily, Schedule) and daily.cron == "0 0 * * *"
    assert isinstance(every, Schedule) and every.next_after(1000.0) == 1080.0
    assert isinstance(cron, Schedule) and cron.cron == "*/5 9-17 * * 1-5"
    assert event == OnEvent("event:memory.added", "memory.added") and roadmap == OnEvent(
        "on_transaction", "transaction"
    )
    assert isinstance(threshold, Threshold) and threshold.holds(99.5) and not threshold.holds(100)
    for bad in ("sometimes", "cron:61 * * * *", "every:0.1s", "threshold:balance ~ 3", "event:"):
        with pytest.raises(TriggerError):
            parse_trigger(bad)


def test_a_daily_schedule_fires_at_midnight_once_per_day_under_a_controlled_clock(tmp_path: Path) -> None:
    # Arrange: 23:59 local time, an agent that reports when it was scheduled
    _agent_file(
        tmp_path / "agents",
        "nightly",
        """
        import mirador

        @mirador.agent
        class Nightly:
            triggers = ["daily"]

            async def analyze(self, context):
                return mirador.Alert("tick", body=str(context.event.data["scheduled"]))
        """,
    )
    start = datetime(2026, 12, 5, 23, 59, 0).timestamp()
    midnight = datetime(2026, 12, 6, 0, 0, 0).timestamp()
    clock = ControlledClock(start)

    async def scenario() -> None:
        async with running_agents(tmp_path, clock) as (service, _):
            nightly = service.get("Nightly")
            await until(lambda: bool(nightly.next_fire))
            assert nightly.next_fire == {"daily": midnight}
            # Act: a minute before midnight nothing fires; one second after, it does, once
            clock.set(midnight - 1)
            await trio.sleep(0.2)
            assert alerts_of(service) == []
            clock.set(midnight + 1)
            await until(lambda: len(alerts_of(service)) == 1)
            clock.set(midnight + 120)
            await trio.sleep(0.3)
            one_day = alerts_of(service)
            clock.set(midnight + 86400 + 5)
            await until(lambda: len(alerts_of(service)) == 2)
            both = alerts_of(service)

        # Assert
        assert len(one_day) == 1 and float(one_day[0].body) == midnight
        assert one_day[0].event == "schedule" and one_day[0].event_data["trigger"] == "daily"
        assert float(both[1].body) == midnight + 86400

    run(scenario)


def test_an_emitted_event_fires_its_agent_once_with_the_event(tmp_path: Path) -> None:
    # Arrange
    _agent_file(
        tmp_path / "agents",
        "spending",
        """
        import mirador

        @mirador.agent
        class Spending:
            triggers = ["on_transaction"]

            async def analyze(self, context):
                amount = context.event.data["amount"]
                if amount > 100:
                    return mirador.Alert(f"large payment: {amount}", level="warning")
                return None
        """,
    )

    async def scenario() -> None:
        async with running_agents(tmp_path) as (service, bus):
            spending = service.get("Spending")
            # Act
            bus.emit("transaction", {"amount": 250})
            await until(lambda: spending.runs == 1 and not spending.running)
            bus.emit("other", {"amount": 999})
            bus.emit("transaction", {"amount": 5})
            await until(lambda: spending.runs == 2 and not spending.running)
            await trio.sleep(0.2)
            # Assert: one run per matching event, an alert only for the large one
            assert spending.runs == 2
            (alert,) = alerts_of(service)
            assert (alert.title, alert.level, alert.event, alert.event_data) == (
                "large payment: 250",
                "warning",
                "transaction",
                {"amount": 250},
            )

    run(scenario)


def test_a_threshold_fires_once_per_crossing(tmp_path: Path) -> None:
    # Arrange
    _agent_file(
        tmp_path / "agents",
        "balance",
        """
        import mirador

        @mirador.agent
        class LowBalance:
            triggers = ["threshold:balance < 100"]

            async def analyze(self, context):
                return mirador.Alert(f"balance {context.event.data['value']:g}")
        """,
    )

    async def scenario() -> None:
        async with running_agents(tmp_path) as (service, bus):
            agent = service.get("LowBalance")
            # Act: 150 (above), 90 (crosses), 80 (still below), 120 (re-arms), 50 (crosses again)
            for value in (150, 90, 80, 120, 50):
                bus.emit("balance", {"value": value})
                await until(lambda: not agent.running)
                await trio.sleep(0.05)
            await until(lambda: len(alerts_of(service)) >= 2)
            await trio.sleep(0.2)
            # Assert
            assert [a.title for a in alerts_of(service)] == ["balance 90", "balance 50"]
            assert agent.runs == 2

    run(scenario)


def test_an_agent_that_raises_or_hangs_backs_off_and_never_blocks_the_loop(tmp_path: Path) -> None:
    # Arrange: one agent raises, one blocks its thread (time.sleep), one never returns (asyncio sleep)
    _agent_file(
        tmp_path / "agents",
        "bad",
        """
        import asyncio, time
        import mirador

        @mirador.agent
        class Raises:
            triggers = ["on_ping"]
            async def analyze(self, context):
                raise ValueError("broken agent")

        @mirador.agent(timeout_s=0.5)
        class Blocks:
            triggers = ["on_ping"]
            async def analyze(self, context):
                time.sleep(5)

        @mirador.agent(timeout_s=0.5)
        class Sleeps:
            triggers = ["on_ping"]
            async def analyze(self, context):
                await asyncio.sleep(3600)
        """,
    )

    async def scenario() -> None:
        async with running_agents(tmp_path) as (service, bus):
            agents = [service.get(n) for n in ("Raises", "Blocks", "Sleeps")]
            # Act: the loop keeps ticking while they run
            bus.emit("ping")
            ticks = 0
            started = time.monotonic()
            while time.monotonic() - started < 2.0:
                await trio.sleep(0.01)
                ticks += 1
            await until(lambda: not any(a.running for a in agents))
            bus.emit("ping")  # during the back-off: skipped
            await trio.sleep(0.1)
            # Assert
            assert ticks > 50  # the trio loop was never held
            for agent in agents:
                assert agent.runs == 1 and agent.failures == 1 and agent.skipped == 1
                assert agent.backoff_until > time.time()
            assert "broken agent" in (agents[0].last_error or "")
            assert "0.5 s" in (agents[1].last_error or "") and "0.5 s" in (agents[2].last_error or "")
            assert alerts_of(service) == []

    run(scenario)


def test_disabled_agents_skip_triggers_and_manual_runs_use_the_tools(tmp_path: Path) -> None:
    # Arrange
    _agent_file(
        tmp_path / "agents",
        "helper",
        """
        import mirador

        @mirador.agent
        class Helper:
            triggers = ["on_ping"]
            async def analyze(self, context):
                return await context.tool("lookup", key=context.event.data.get("key", "none"))

        @mirador.agent
        class Broken:
            triggers = ["whenever"]
            async def analyze(self, context):
                return None
        """,
    )

    async def scenario() -> None:
        async with running_agents(tmp_path) as (service, bus):
            helper = service.get("Helper")
            # Act
            service.set_enabled("Helper", False)
            bus.emit("ping")
            await trio.sleep(0.2)
            result = await service.run_now("Helper", {"key": "k1"})
            # Assert: the switch is kept in state.db, the manual run ran anyway, a bad agent is reported
            assert helper.runs == 1 and helper.skipped == 1
            assert service.alerts.enabled() == {"Helper": False}
            assert result["alert"]["title"] == "lookup:[('key', 'k1')]" and result["alert"]["event"] == "manual"
            (error,) = service.status()["errors"]
            assert "Broken" in error["error"] and "whenever" in error["error"]

    run(scenario)


def test_an_agent_that_returns_a_malformed_alert_fails_alone(tmp_path: Path) -> None:
    # Arrange: a bad alert (a number as its title) must not reach the service's nursery
    _agent_file(
        tmp_path / "agents",
        "odd",
        """
        import mirador

        @mirador.agent
        class Odd:
            triggers = ["on_ping"]
            async def analyze(self, context):
                return mirador.Alert(123)

        @mirador.agent
        class Fine:
            triggers = ["on_ping"]
            async def analyze(self, context):
                return "pong"
        """,
    )

    async def scenario() -> None:
        async with running_agents(tmp_path) as (service, bus):
            odd, fine = service.get("Odd"), service.get("Fine")
            # Act
            bus.emit("ping")
            await until(lambda: odd.runs == 1 and fine.runs == 1 and not odd.running and not fine.running)
            await until(lambda: len(alerts_of(service)) == 1)
            # Assert: the odd one failed and backs off, the other alerted, the service still runs
            assert odd.failures == 1 and "mirador.Alert" in (odd.last_error or "")
            assert [a.title for a in alerts_of(service)] == ["pong"]

    run(scenario)
