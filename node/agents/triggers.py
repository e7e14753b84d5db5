"""What wakes an agent, parsed from its `triggers` strings:

- schedules: `daily` (00:00), `hourly`, `weekly` (Monday 00:00), `cron:<5 fields>` or a bare 5-field cron expression
  (croniter, local time), `every:<N>s|m|h|d`;
- events: `event:<name>` or `on_<name>` (the roadmap's `on_transaction` is the event `transaction`); the built-in
  events are `memory.added`, `feedback.given`, `adapter.installed`, `federation.round_applied`, `file.changed`;
- thresholds: `threshold:<metric> <op> <value>` with op one of < <= > >=: fires when the metric (the `value` of the
  latest event of that name) crosses into the condition, once per crossing (it re-arms when the condition stops
  holding).
"""

import re
from dataclasses import dataclass
from datetime import datetime

from croniter import croniter

from crypto.refusal import SingleReason

BUILT_IN_EVENTS = ("memory.added", "feedback.given", "adapter.installed", "federation.round_applied", "file.changed")
SCHEDULE_ALIASES = {"daily": "0 0 * * *", "hourly": "0 * * * *", "weekly": "0 0 * * 1"}
_EVERY = re.compile(r"^every:(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_THRESHOLD = re.compile(r"^threshold:\s*([A-Za-z0-9_.-]{1,64})\s*(<=|>=|<|>)\s*(-?\d+(?:\.\d+)?(?:e-?\d+)?)\s*$")
_EVENT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_INTERVAL_S = 1.0


class TriggerError(SingleReason):
    """A trigger string that means nothing."""

    REASON = "invalid_trigger"


@dataclass(frozen=True)
class Schedule:
    """A time trigger: a cron expression or a fixed interval."""

    text: str
    cron: str | None = None
    every_s: float | None = None

    def next_after(self, now: float) -> float:
        """The first firing time strictly after `now` (unix seconds; cron in local time)."""
        if self.every_s is not None:
            return (now // self.every_s + 1) * self.every_s
        assert self.cron is not None
        return float(croniter(self.cron, datetime.fromtimestamp(now)).get_next(float))


@dataclass(frozen=True)
class OnEvent:
    """An event trigger."""

    text: str
    name: str


@dataclass(frozen=True)
class Threshold:
    """A metric crossing a value."""

    text: str
    metric: str
    op: str
    value: float

    def holds(self, x: float) -> bool:
        """Whether the condition holds for the metric value `x`."""
        return {"<": x < self.value, "<=": x <= self.value, ">": x > self.value, ">=": x >= self.value}[self.op]


Trigger = Schedule | OnEvent | Threshold


def parse_trigger(text: str) -> Trigger:
    """One trigger string as a Trigger; TriggerError says what is accepted."""
    raw = text.strip()
    if raw in SCHEDULE_ALIASES:
        return Schedule(raw, cron=SCHEDULE_ALIASES[raw])
    if m := _EVERY.match(raw):
        every = float(m.group(1)) * _UNIT_S[m.group(2)]
        if every < MIN_INTERVAL_S:
            raise TriggerError(f"{text!r}: the shortest interval is {MIN_INTERVAL_S:g} s")
        return Schedule(raw, every_s=every)
    cron = raw.removeprefix("cron:").strip()
    if raw.startswith("cron:") or len(raw.split()) == 5:
        if len(cron.split()) != 5 or not croniter.is_valid(cron):
            raise TriggerError(f"{text!r}: not a 5-field cron expression (minute hour day month weekday)")
        return Schedule(raw, cron=cron)
    if raw.startswith(("event:", "on_")):
        name = raw.removeprefix("event:") if raw.startswith("event:") else raw.removeprefix("on_")
        if not _EVENT_NAME.match(name):
            raise TriggerError(f"{text!r}: event names use letters, digits, '.', '_' and '-' (at most 64)")
        return OnEvent(raw, name)
    if m := _THRESHOLD.match(raw):
        return Threshold(raw, m.group(1), m.group(2), float(m.group(3)))
    raise TriggerError(
        f"{text!r}: use daily, hourly, weekly, every:<N>s|m|h|d, cron:<expression>, event:<name> (or on_<name>), "
        "or threshold:<metric> <op> <value>"
    )


def parse_triggers(raw: object) -> list[Trigger]:
    """An agent's `triggers` attribute (a list of strings) parsed; TriggerError on the first bad one."""
    if isinstance(raw, str) or not isinstance(raw, list | tuple) or not all(isinstance(t, str) for t in raw):
        raise TriggerError("triggers must be a list of strings")
    if not raw:
        raise TriggerError("an agent needs at least one trigger")
    return [parse_trigger(t) for t in raw]
