"""The daemon's tools: the registry filled with the built-ins, the user's `MIRADOR_HOME/tools/*.py` and the tools of
the MCP servers in `[tools] mcp`, and the sandbox they share."""

import logging
from typing import Any

import trio

from node.core.config import ToolsSection
from node.core.home import NodeHome
from node.memory.service import MemoryService
from node.tools.builtin import calculate_tool, run_python_tool, search_docs_tool
from node.tools.loader import load_folder
from node.tools.registry import ToolRefused, ToolRegistry
from node.tools.sandbox import Limits, Sandbox

log = logging.getLogger(__name__)


class ToolService:
    """The node's tools and what they need."""

    def __init__(self, home: NodeHome, cfg: ToolsSection, memory: MemoryService | None) -> None:
        self.cfg = cfg
        self.registry = ToolRegistry()
        self.sandbox = Sandbox(cfg.bwrap, Limits(cpu_s=cfg.cpu_s, wall_s=cfg.wall_s, memory_mb=cfg.memory_mb))
        self.errors: list[tuple[str, str]] = []  # (file or server, why it gave no tools)
        home.scratch_dir.mkdir(mode=0o700, exist_ok=True)
        self.registry.add(run_python_tool(self.sandbox, home.scratch_dir))
        self.registry.add(calculate_tool(self.sandbox))
        if memory is not None:
            self.registry.add(search_docs_tool(memory))
        loaded = load_folder(home.tools_dir, "tools", cfg.user_timeout_s)
        self.errors += loaded.errors
        for tool in loaded.tools:
            self._offer(tool.origin, tool)
        self.mcp: Any = None  # node.tools.mcp_client.McpClients once run() started them

    def _offer(self, origin: str, tool: Any) -> None:
        try:
            self.registry.add(tool)
        except ToolRefused as exc:
            self.errors.append((origin, exc.detail))
            log.error("tools: %s", exc)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect the configured MCP servers (each in the background: a slow one delays nothing), then wait."""
        if self.cfg.mcp:
            from node.tools.mcp_client import McpClients

            self.mcp = McpClients(self.cfg.mcp, self._offer, self.errors)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.mcp.run)
                task_status.started()
                await trio.sleep_forever()
        task_status.started()
        await trio.sleep_forever()

    def status(self) -> dict[str, Any]:
        """The tools and what failed to load, for GET /v1/tools."""
        return {
            "tools": [
                {"name": t.name, "description": t.description, "parameters": t.parameters, "origin": t.origin}
                for t in self.registry.tools()
            ],
            "errors": [{"where": where, "error": why} for where, why in self.errors],
        }
