"""Strict request schemas of the tool, event and agent routes."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ToolCallRequest(BaseModel):
    """POST /v1/tools/{name}: the tool's arguments (checked against its JSON Schema by the registry)."""

    model_config = ConfigDict(extra="forbid")

    arguments: dict[str, Any] = Field(default_factory=dict)


class EventRequest(BaseModel):
    """POST /v1/events: an event for the agents (`value`, when given, is the metric that thresholds watch)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    data: dict[str, Any] = Field(default_factory=dict)
    value: float | None = None


class AgentRunRequest(BaseModel):
    """POST /v1/agents/{name}/run: the data of the `manual` event it gets."""

    model_config = ConfigDict(extra="forbid")

    data: dict[str, Any] = Field(default_factory=dict)
