"""What several benchmarks share: count argument types, the result header and JSON writer, a warning counter."""

import argparse
import json
import logging
import os
import platform
import re
import shlex
import sys
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

FORTUNES_DIR = Path("/usr/share/games/fortunes")
INSTALL_HINT = "`bash scripts/install.sh --bench` (which runs `apt-get install -y fortunes`)"
_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def read_fortunes(path: Path) -> list[str]:
    """The cleaned, de-duplicated entries of one fortunes file (one string per entry, no blank lines inside)."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    entries: list[str] = []
    seen: set[str] = set()
    for raw in re.split(r"^%$", text, flags=re.MULTILINE):
        cleaned = _CONTROL.sub("", _OVERSTRIKE.sub("", raw))
        lines = [line.rstrip() for line in cleaned.split("\n") if line.strip()]
        entry = "\n".join(lines)
        if entry and entry not in seen:
            seen.add(entry)
            entries.append(entry)
    return entries


def positive_int(text: str) -> int:
    """An integer ≥ 1 (argparse names the option when this raises)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer ≥ 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is less than {low}")
    return value


def write_json(path: Path, result: dict[str, Any]) -> None:
    """The results as JSON (written whole, then renamed over the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)


class LogCounter(logging.Handler):
    """Counts log messages at or above `level` (peer IDs, hashes and digits folded) instead of printing them."""

    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        """Count one message."""
        text = re.sub(r"12D3KooW\w+|Qm\w{44}|baf\w{50,}|[0-9a-f]{16,}", "<id>", " ".join(record.getMessage().split()))
        text = f"{record.name}: " + re.sub(r"\d+", "N", text)[:200]
        self.counts[text] = self.counts.get(text, 0) + 1

    def top(self, n: int = 10) -> dict[str, int]:
        """The `n` most frequent messages with their counts."""
        return dict(sorted(self.counts.items(), key=lambda kv: -kv[1])[:n])


def load() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def run_header(*packages: str) -> dict[str, Any]:
    """What every result file starts with: the command, when, on what machine and load, and package versions."""
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "load_before": load(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    } | {package: package_version(package) for package in packages}


def extra_buffers(model_path: Path) -> bool:
    """The node's choice of llama.cpp's extra buffer types for `model_path` ($MIRADOR_INFERENCE_EXTRA_BUFFERS, else
    auto: probed in child processes once, cached in bench/results/probe_cache.json): no bench path crashes where the
    node would not."""
    from node.inference.extra_buffers import choose

    setting: Any = os.environ.get("MIRADOR_INFERENCE_EXTRA_BUFFERS", "auto")
    return choose(model_path, setting, Path(__file__).parent / "results" / "probe_cache.json").use


def high_level_llama(path: Path, **kwargs: Any) -> Any:
    """llama-cpp-python's high-level `Llama` with the node's extra-buffers choice.

    `Llama` does not expose `use_extra_bufts`: its `llama_model_default_params` is wrapped while it is built.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as binding  # the module `Llama.__init__` calls it from

    use = extra_buffers(path)
    default = binding.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = use
        return p

    binding.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        binding.llama_model_default_params = default
