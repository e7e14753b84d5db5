"""One choice of llama.cpp's extra buffer types (weight repacking: AMX, CPU_REPACK, ...) for every GGUF load.

A `-march=native` build enables the kernels of every instruction set the build machine has. On Intel AMX Xeons
the AMX buffer type repacks Q4_0/Q4_1 weights and the first `llama_decode` dies with SIGSEGV (llama.cpp #20824), or
answers wrongly where it runs (llama.cpp PR #16315). A native crash cannot be caught in-process, so `auto` asks two
child processes (`node.inference.probe`): one with extra buffers off (the reference), one with them on. Extra
buffers stay on only if that child lives and its logits match the reference at every position. The verdict is
cached per (model file digest, llama.cpp build, CPU flags) under MIRADOR_HOME, so the probe runs once.
"""

import hashlib
import json
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from node.core.fsutil import atomic_write_text
from node.inference.probe import EXIT_LOAD_FAILED

Setting = Literal["auto", "on", "off"]
SETTINGS: tuple[Setting, ...] = ("auto", "on", "off")
CACHE_FORMAT = 1
PROBE_TIMEOUT_S = 180.0
MIN_CORRELATION = 0.995  # per position, logits with extra buffers vs the plain CPU path
# (buffer type, llama_ftype) pairs llama.cpp is known to get wrong: off without trusting a probe that happened to pass.
KNOWN_BAD = {
    ("AMX", 2): "llama.cpp's AMX kernels crash or answer wrongly on Q4_0 weights (llama.cpp #20824, PR #16315)",
    ("AMX", 3): "llama.cpp's AMX kernels crash or answer wrongly on Q4_1 weights (llama.cpp #20824, PR #16315)",
}
_PLAIN_BUFFERS = {"CPU", "CPU_Mapped"}


class ProbeError(RuntimeError):
    """llama.cpp cannot load the model file (`unloadable`), or cannot decode it on this machine even without extra
    buffer types."""

    def __init__(self, message: str, unloadable: bool = False) -> None:
        super().__init__(message)
        self.unloadable = unloadable


@dataclass(frozen=True)
class Verdict:
    """Whether GGUF loads use extra buffer types, and why."""

    use: bool
    setting: Setting
    source: Literal["setting", "probe", "cache"]
    reason: str
    facts: dict[str, Any] = field(default_factory=dict)  # what the probe measured (types, buffers, tok/s)

    @property
    def fell_back(self) -> bool:
        """True when `auto` turned extra buffers off because of what the probe found."""
        return self.setting == "auto" and not self.use

    def describe(self) -> str:
        """One line for the log and `mirador doctor`."""
        state = "on" if self.use else "off"
        origin = {"setting": "[inference] extra_buffers", "probe": "probe", "cache": "cached probe verdict"}
        return f"llama.cpp extra buffer types {state} ({origin[self.source]}): {self.reason}"


def choose(model_path: Path, setting: Setting, cache_file: Path | None, timeout_s: float = PROBE_TIMEOUT_S) -> Verdict:
    """The extra-buffers choice for `model_path`: the setting itself, or (auto) the cached or probed verdict."""
    if setting not in SETTINGS:
        raise ValueError(f"extra_buffers must be one of {', '.join(SETTINGS)}, not {setting!r}")
    if setting != "auto":
        return Verdict(setting == "on", setting, "setting", f"set to {setting!r}")
    cache = _Cache(cache_file)
    key = probe_key(model_path, cache)
    cached = cache.verdict(key)
    if cached is not None:
        return Verdict(bool(cached["use"]), "auto", "cache", str(cached["reason"]), dict(cached.get("facts", {})))
    verdict = probe(model_path, timeout_s)
    cache.store(key, verdict)
    return verdict


def probe(model_path: Path, timeout_s: float = PROBE_TIMEOUT_S) -> Verdict:
    """Run both probe children side by side and judge (no cache)."""
    with tempfile.TemporaryDirectory(prefix="mirador-probe-") as tmp:
        off, on = (_Child(model_path, mode, Path(tmp)) for mode in (False, True))
        deadline = time.monotonic() + timeout_s
        off.wait(deadline)
        on.wait(deadline)
        if off.unloadable:
            raise ProbeError(f"cannot load the model: {off.failure}", unloadable=True)
        if off.failure is not None:
            raise ProbeError(
                f"llama.cpp cannot decode {model_path.name} on this machine even without extra buffer types: "
                f"the probe {off.failure}"
            )
        return _judge(off, on)


def _judge(off: "_Child", on: "_Child") -> Verdict:
    ref = off.report
    types = list(ref["extra_buffer_types"])
    facts: dict[str, Any] = {"extra_buffer_types": types, "off_tok_s": ref["decode_tok_s"]}
    if not types:
        return Verdict(True, "auto", "probe", "this llama.cpp build offers no extra buffer types on this CPU", facts)
    if on.failure is not None:
        return Verdict(False, "auto", "probe", f"with {', '.join(types)} the probe {on.failure}", facts)
    for buft in types:
        known = KNOWN_BAD.get((buft, int(ref["ftype"])))
        if known is not None:
            return Verdict(False, "auto", "probe", known, facts)
    used = {name: mib for name, mib in on.report["weight_buffers"].items() if name not in _PLAIN_BUFFERS}
    facts |= {"weight_buffers": used, "on_tok_s": on.report["decode_tok_s"]}
    names = ", ".join(f"{name} {mib:g} MiB" for name, mib in used.items()) or ", ".join(types)
    mismatch = compare_logits(off.logits(), on.logits())
    if mismatch is not None:
        return Verdict(False, "auto", "probe", f"with {names} llama.cpp answered wrongly: {mismatch}", facts)
    if not used:
        reason = f"no weight of this model goes to {', '.join(types)}: both paths are the same"
        return Verdict(True, "auto", "probe", reason, facts)
    return Verdict(True, "auto", "probe", f"{names} answered as the plain CPU path", facts)


def compare_logits(ref: "np.ndarray", got: "np.ndarray") -> str | None:
    """None when `got` matches `ref` at every position (correlation and top token); else what differs."""
    if ref.shape != got.shape:
        return f"{got.shape} logits where the reference has {ref.shape}"
    if not np.isfinite(got).all():
        return "non-finite logits"
    for pos in range(ref.shape[0]):
        corr = float(np.corrcoef(ref[pos], got[pos])[0, 1])
        if not corr >= MIN_CORRELATION:
            return f"logit correlation {corr:.3f} at position {pos} (needs {MIN_CORRELATION})"
        if int(ref[pos].argmax()) != int(got[pos].argmax()):
            return f"top token {int(got[pos].argmax())} instead of {int(ref[pos].argmax())} at position {pos}"
    return None


class _Child:
    """One running probe child."""

    def __init__(self, model_path: Path, extra_buffers: bool, tmp: Path) -> None:
        mode = "on" if extra_buffers else "off"
        self.out = tmp / f"{mode}.npy"
        self.stderr = tmp / f"{mode}.stderr"
        cmd = [sys.executable, "-m", "node.inference.probe", str(model_path), "--extra-buffers", mode]
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [*cmd, "--out", str(self.out)], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL
            )
        self.failure: str | None = None
        self.unloadable = False  # llama.cpp refused the file itself
        self.report: dict[str, Any] = {}

    def wait(self, deadline: float) -> None:
        """Wait for the child (killing it at `deadline`) and read its report or what killed it."""
        try:
            stdout, _ = self.proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            self.failure = "did not finish in time (killed)"
            return
        code = self.proc.returncode
        if code < 0:
            self.failure = f"died of {_signal_name(-code)} (a native crash)"
        elif code != 0:
            tail = (self.stderr.read_text(errors="replace").strip().splitlines() or ["no message"])[-1]
            self.unloadable = code == EXIT_LOAD_FAILED
            self.failure = tail if self.unloadable else f"exited with code {code}: {tail}"
        else:
            try:
                self.report = json.loads(stdout.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                self.failure = "printed no report"

    def logits(self) -> "np.ndarray":
        """The logits the child wrote."""
        return np.asarray(np.load(self.out, allow_pickle=False))


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def probe_key(model_path: Path, cache: "_Cache | None" = None) -> str:
    """What a verdict depends on: the model file's digest, the llama.cpp build and the CPU's flags."""
    parts = {
        "format": CACHE_FORMAT,
        "model": (cache or _Cache(None)).digest(model_path),
        "llama": llama_build_id(),
        "cpu": cpu_flags(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def llama_build_id() -> str:
    """llama-cpp-python's version and a digest of its native libraries (a rebuild with other flags changes it)."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    h = hashlib.sha256()
    for path in sorted(lib.glob("*.so*")) + sorted(lib.glob("*.dylib")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return f"{llama_cpp.__version__}:{h.hexdigest()[:16]}"


def cpu_flags() -> str:
    """The CPU's feature flags (x86 `flags`, arm64 `Features` of /proc/cpuinfo), or the processor's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in {"flags", "Features"}:
                return f"{platform.machine()}: {' '.join(sorted(value.split()))}"
    except OSError:
        pass
    return f"{platform.machine()}: {platform.processor()}"


class _Cache:
    """Probe verdicts and model digests in one JSON file (written atomically; a broken file is ignored)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {"format": CACHE_FORMAT, "verdicts": {}, "digests": {}}
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text())
                if loaded.get("format") == CACHE_FORMAT and all(
                    isinstance(loaded.get(part), dict) for part in ("verdicts", "digests")
                ):
                    self.data = loaded
            except (OSError, ValueError, AttributeError):
                pass

    def verdict(self, key: str) -> dict[str, Any] | None:
        """The cached verdict for `key`, if any (an entry of the wrong shape counts as none: the probe runs again)."""
        found = self.data["verdicts"].get(key)
        if not isinstance(found, dict):
            return None
        ok = isinstance(found.get("use"), bool) and isinstance(found.get("reason"), str)
        return found if ok and isinstance(found.get("facts", {}), dict) else None

    def store(self, key: str, verdict: Verdict) -> None:
        """Remember `verdict` under `key`."""
        entry = asdict(verdict) | {"decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.data["verdicts"][key] = entry
        self._save()

    def digest(self, model_path: Path) -> str:
        """sha256 of the model file, remembered by (path, size, mtime) so a large model is hashed once."""
        st = model_path.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        known = self.data["digests"].get(str(model_path))
        if isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
            return str(known["sha256"])
        h = hashlib.sha256()
        with open(model_path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        self.data["digests"][str(model_path)] = {"stamp": stamp, "sha256": h.hexdigest()}
        self._save()
        return h.hexdigest()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True), mode=0o600)
