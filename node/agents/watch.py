"""`file.changed` events for the folders in `[agents] watch`: a poll of each folder's files (size and modification
time) every `watch_interval_s`, no inotify needed; at most MAX_FILES files per folder are looked at."""

import logging
import os
from pathlib import Path

import trio

from node.agents.events import EventBus

log = logging.getLogger(__name__)

MAX_FILES = 10_000
Snapshot = dict[str, tuple[int, int]]


def snapshot(folder: Path) -> Snapshot:
    """path -> (size, mtime_ns) of the regular files under `folder` (symlinks not followed; MAX_FILES at most)."""
    found: Snapshot = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = os.path.join(root, name)
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            found[path] = (st.st_size, st.st_mtime_ns)
            if len(found) >= MAX_FILES:
                return found
    return found


def changes(before: Snapshot, after: Snapshot) -> list[tuple[str, str]]:
    """(path, created|modified|deleted) between two snapshots, by path."""
    out = [(p, "created") for p in after.keys() - before.keys()]
    out += [(p, "deleted") for p in before.keys() - after.keys()]
    out += [(p, "modified") for p in after.keys() & before.keys() if after[p] != before[p]]
    return sorted(out)


async def watch(folders: list[Path], interval_s: float, bus: EventBus) -> None:
    """Emit `file.changed` {path, change, folder} for every change under `folders`, until cancelled."""
    seen = {f: await trio.to_thread.run_sync(snapshot, f) for f in folders}
    for folder in folders:
        if not folder.is_dir():
            log.warning("agents: %s is not a folder; watching it for when it appears", folder)
    while True:
        await trio.sleep(interval_s)
        for folder in folders:
            now = await trio.to_thread.run_sync(snapshot, folder)
            for path, change in changes(seen[folder], now):
                bus.emit("file.changed", {"path": path, "change": change, "folder": str(folder)}, source="watch")
            seen[folder] = now
