"""Agents in a real daemon: events from the CLI and the API, built-in events (feedback given, a file changed), alerts
kept in state.db and streamed by GET /v1/events, and agents that raise or hang while chat goes on."""

import json
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon_harness import Daemon, run_cli, running

AGENTS = textwrap.dedent(
    """
    import asyncio, time
    import mirador

    @mirador.agent
    class Spending:
        triggers = ["on_transaction"]
        async def analyze(self, context):
            amount = context.event.data.get("amount", 0)
            return mirador.Alert(f"payment of {amount}", level="warning") if amount > 100 else None

    @mirador.agent
    class Feedback:
        triggers = ["event:feedback.given"]
        async def analyze(self, context):
            return f"rated {context.event.data['rating']}"

    @mirador.agent
    class Files:
        triggers = ["event:file.changed"]
        async def analyze(self, context):
            return mirador.Alert("file " + context.event.data["change"], body=context.event.data["path"])

    @mirador.agent
    class Raises:
        triggers = ["on_ping"]
        async def analyze(self, context):
            raise RuntimeError("agent bug")

    @mirador.agent(timeout_s=1)
    class Blocks:
        triggers = ["on_ping"]
        async def analyze(self, context):
            time.sleep(20)

    @mirador.agent(timeout_s=1)
    class Sleeps:
        triggers = ["on_ping"]
        async def analyze(self, context):
            await asyncio.sleep(3600)
    """
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("agents")
    (root / "home" / "agents").mkdir(parents=True)
    (root / "home" / "agents" / "mine.py").write_text(AGENTS)
    (root / "watched").mkdir()
    env = {"MIRADOR_AGENTS_WATCH": str(root / "watched"), "MIRADOR_AGENTS_WATCH_INTERVAL_S": "0.2"}
    yield from running(root / "home", env)


class EventStream:
    """GET /v1/events read in a thread: the events seen so far."""

    def __init__(self, node: Daemon, names: str = "") -> None:
        self.events: list[dict[str, Any]] = []
        self._open = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(60, connect=5))
        self._thread = threading.Thread(target=self._read, args=(node, names), daemon=True)
        self._thread.start()
        assert self._open.wait(10), "the event stream did not open"

    def _read(self, node: Daemon, names: str) -> None:
        try:
            with self._client.stream("GET", f"{node.url}/v1/events?names={names}", headers=node.auth) as resp:
                self._open.set()
                name = None
                for line in resp.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        self.events.append({"event": name} | json.loads(line[6:]))
        except httpx.HTTPError:
            if not self._closed:
                raise

    _closed = False

    def close(self) -> None:
        self._closed = True
        self._client.close()


def wait_for(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError("timed out")


def alerts(node: Daemon, agent: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{node.url}/v1/agents/alerts?agent={agent}", headers=node.auth, timeout=10)
    return list(resp.json()["data"])


def test_an_event_from_the_cli_fires_its_agent_once_and_the_alert_is_streamed_and_listed(node: Daemon) -> None:
    # Arrange
    stream = EventStream(node, names="alert")
    try:
        # Act
        emitted = run_cli(node.home, node.port, "event", "emit", "transaction", "amount=250", "shop=bakery")
        seen = wait_for(lambda: [e for e in stream.events if e["data"]["agent"] == "Spending"])
        listed = run_cli(node.home, node.port, "agents", "alerts", "--agent", "Spending")
    finally:
        stream.close()
    # Assert
    assert emitted.returncode == 0, emitted.stderr
    (alert,) = seen
    assert alert["event"] == "alert" and alert["source"] == "agent:Spending"
    assert alert["data"]["title"] == "payment of 250" and alert["data"]["level"] == "warning"
    assert alert["data"]["event_data"] == {"amount": 250, "shop": "bakery"}
    assert listed.returncode == 0 and "[warning] Spending: payment of 250" in listed.stdout
    assert len(alerts(node, "Spending")) == 1


def test_agents_that_raise_or_hang_leave_chat_answering(node: Daemon) -> None:
    # Act: wake the broken agents, then chat while one of them blocks its thread
    resp = httpx.post(f"{node.url}/v1/events", json={"name": "ping"}, headers=node.auth, timeout=10)
    chat = node.chat("Say hi", max_tokens=8)
    status = wait_for(lambda: all_failed_once(node))
    # Assert
    assert resp.status_code == 200 and chat.status_code == 200
    assert chat.json()["choices"][0]["message"]["content"]
    assert "agent bug" in status["Raises"]["last_error"]
    assert "1 s" in status["Blocks"]["last_error"] and "1 s" in status["Sleeps"]["last_error"]
    assert "agent Raises failed" in node.log() and "RuntimeError: agent bug" in node.log()


BROKEN = ("Raises", "Blocks", "Sleeps")


def all_failed_once(node: Daemon) -> dict[str, dict[str, Any]] | None:
    """The agents' status once each broken agent has failed once, else None."""
    status = agent_map(node)
    return status if all(status[name]["failures_in_a_row"] == 1 for name in BROKEN) else None


def agent_map(node: Daemon) -> dict[str, dict[str, Any]]:
    listing = httpx.get(f"{node.url}/v1/agents", headers=node.auth, timeout=10).json()
    return {a["name"]: a for a in listing["agents"]}


def test_built_in_events_wake_agents_feedback_and_a_changed_file(node: Daemon) -> None:
    # Arrange
    chat = node.chat("Hello")
    completion = chat.json()["id"]
    # Act
    rated = httpx.post(
        f"{node.url}/v1/feedback", json={"completion_id": completion, "rating": 5}, headers=node.auth, timeout=10
    )
    note = Path(node.env["MIRADOR_AGENTS_WATCH"]) / "note.txt"
    note.write_text("groceries")
    feedback = wait_for(lambda: alerts(node, "Feedback"))
    files = wait_for(lambda: alerts(node, "Files"))
    # Assert
    assert rated.status_code == 200
    assert feedback[0]["title"] == "rated 5" and feedback[0]["event"] == "feedback.given"
    assert files[0]["title"] == "file created" and files[0]["body"] == str(note)


def test_agents_are_switched_from_the_cli_and_node_made_events_are_refused(node: Daemon) -> None:
    # Act
    off = run_cli(node.home, node.port, "agents", "disable", "Spending")
    run_cli(node.home, node.port, "event", "emit", "transaction", "--data", '{"amount": 999}')
    time.sleep(0.5)
    listed = run_cli(node.home, node.port, "agents", "list")
    on = run_cli(node.home, node.port, "agents", "enable", "Spending")
    manual = run_cli(node.home, node.port, "agents", "run", "Spending", "amount=500")
    reserved = httpx.post(f"{node.url}/v1/events", json={"name": "alert"}, headers=node.auth, timeout=10)
    built_in = httpx.post(f"{node.url}/v1/events", json={"name": "memory.added"}, headers=node.auth, timeout=10)
    huge = httpx.post(
        f"{node.url}/v1/events", json={"name": "blob", "data": {"x": "y" * 70_000}}, headers=node.auth, timeout=10
    )
    anonymous = httpx.post(f"{node.url}/v1/events", json={"name": "transaction"}, timeout=10)
    # Assert
    assert off.returncode == 0 and "Spending: disabled" in off.stdout
    assert agent_map(node)["Spending"]["skipped"] >= 1
    assert "off Spending" in listed.stdout and on.returncode == 0
    assert manual.returncode == 0 and "payment of 500" in manual.stdout
    assert [a["title"] for a in alerts(node, "Spending")] == ["payment of 500", "payment of 250"]
    assert reserved.status_code == 400 and reserved.json()["error"]["code"] == "reserved_event"
    assert built_in.status_code == 400 and huge.status_code == 413
    assert anonymous.status_code == 401
