"""Loading the user's own tools and agents: every `*.py` of `MIRADOR_HOME/tools/` and `MIRADOR_HOME/agents/`.

These files are the user's own code and run in the daemon's process (as a shell profile does); tools that are not
the user's own (the model's code, sympy expressions) run in the sandbox instead (node.tools.sandbox). A file that
fails to import, or a definition that cannot be offered, is reported with its file and skipped: the others load.
"""

import importlib.util
import logging
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from node import sdk
from node.tools.registry import Tool, ToolReason, ToolRefused, check_definition
from node.tools.signature import SignatureError, signature_of
from node.tools.userland import UserCodeTimeout, run_user_code

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0


@dataclass
class Loaded:
    """What a folder gave: tools, agent classes, and (file, error) for what could not load."""

    tools: list[Tool] = field(default_factory=list)
    agents: list[tuple[sdk.AgentMark, type, str]] = field(default_factory=list)  # (mark, class, origin)
    errors: list[tuple[str, str]] = field(default_factory=list)


def provide_sdk() -> None:
    """Make `import mirador` give node.sdk (the name user files import)."""
    sys.modules.setdefault("mirador", sdk)


def _import(path: Path, package: str) -> ModuleType:
    name = f"mirador_user.{package}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def user_tool(fn: Any, mark: sdk.ToolMark, origin: str, default_timeout_s: float = DEFAULT_TIMEOUT_S) -> Tool:
    """A `@mirador.tool` function as a Tool: arguments converted to its types, run as user code with a timeout."""
    sig = signature_of(fn, mark.description)
    check_definition(mark.name, sig.parameters)
    timeout = mark.timeout_s or default_timeout_s

    async def run(arguments: dict[str, Any]) -> Any:
        try:
            kwargs = sig.arguments(arguments)
        except ValueError as exc:
            raise ToolRefused(ToolReason.INVALID_ARGUMENTS, f"{mark.name}: {exc}") from None
        try:
            return await run_user_code(fn, (), kwargs, timeout)
        except UserCodeTimeout as exc:
            raise ToolRefused(ToolReason.TIMEOUT, str(exc)) from None

    return Tool(mark.name, sig.description, sig.parameters, origin, run)


def load_folder(folder: Path, package: str, default_timeout_s: float = DEFAULT_TIMEOUT_S) -> Loaded:
    """Import every `*.py` in `folder` (sorted; names starting with `_` skipped) and collect what they mark (tools
    without their own timeout get `default_timeout_s`)."""
    provide_sdk()
    loaded = Loaded()
    if not folder.is_dir():
        return loaded
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        origin = f"user:{package}/{path.name}"
        try:
            module = _import(path, package)
        except BaseException as exc:  # a user file may raise anything at import, SystemExit included
            if isinstance(exc, KeyboardInterrupt):
                raise
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            loaded.errors.append((str(path), detail))
            log.error("%s: cannot load: %s", path, detail)
            continue
        for value in list(vars(module).values()):
            if getattr(value, "__module__", None) != module.__name__:
                continue  # imported from elsewhere, not defined here
            try:
                if isinstance(tool_mark := getattr(value, sdk.TOOL_MARK, None), sdk.ToolMark):
                    loaded.tools.append(user_tool(value, tool_mark, origin, default_timeout_s))
                elif isinstance(agent_mark := getattr(value, sdk.AGENT_MARK, None), sdk.AgentMark):
                    loaded.agents.append((agent_mark, value, origin))
            except (SignatureError, ToolRefused) as exc:
                loaded.errors.append((str(path), str(exc)))
                log.error("%s: %s", path, exc)
    return loaded
