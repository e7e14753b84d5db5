"""llama.cpp's extra buffer types: the probe decides in child processes, falls back on a real crash or a wrong
answer, caches its verdict, and the choice reaches llama.cpp's model parameters."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import llama_cpp as ll
import pytest

from node.inference.extra_buffers import KNOWN_BAD, ProbeError, choose, compare_logits, probe_key
from node.inference.llama_backend import LlamaModel, extra_buffer_types
from node.inference.models import embedded_model_path
from tests.daemon_harness import spawn_daemon, start_daemon, wait_ready


@pytest.fixture(scope="module")
def q4_0_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model requantized to Q4_0 by llama.cpp itself: weights CPU_REPACK takes on x86 and arm64."""
    out = tmp_path_factory.mktemp("q40") / "smollm2-q4_0.gguf"
    params = ll.llama_model_quantize_default_params()
    params.ftype = 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = 2
    assert ll.llama_model_quantize(str(embedded_model_path()).encode(), str(out).encode(), params) == 0
    return out


def expected_healthy_use(model: Path) -> bool:
    """What `auto` keeps for a healthy probe: on, unless a buffer type offered here is known bad for the model."""
    loaded = LlamaModel(model, extra_buffers=False)
    ftype = loaded.ftype
    loaded.close()
    return not any((buft, ftype) in KNOWN_BAD for buft in extra_buffer_types())


def test_a_healthy_probe_keeps_extra_buffers_on_and_caches_the_verdict(q4_0_model: Path, tmp_path: Path) -> None:
    # Arrange
    cache = tmp_path / "cache" / "extra_buffers.json"
    # Act
    verdict = choose(q4_0_model, "auto", cache)
    again = choose(q4_0_model, "auto", cache)
    # Assert
    assert verdict.source == "probe" and verdict.use == expected_healthy_use(q4_0_model), verdict
    assert again.source == "cache" and again.use == verdict.use and again.reason == verdict.reason
    assert cache.stat().st_mode & 0o777 == 0o600


def test_a_probe_child_killed_by_sigsegv_turns_extra_buffers_off(
    monkeypatch: pytest.MonkeyPatch, q4_0_model: Path
) -> None:
    # Arrange: the child loading with extra buffers on dies by a real SIGSEGV (read of address 0)
    monkeypatch.setenv("MIRADOR_TEST_FAULT", "probe_crash")
    # Act
    verdict = choose(q4_0_model, "auto", None)
    # Assert
    assert not verdict.use and verdict.fell_back
    assert "died of SIGSEGV" in verdict.reason


def test_a_probe_child_that_answers_wrongly_turns_extra_buffers_off(
    monkeypatch: pytest.MonkeyPatch, q4_0_model: Path
) -> None:
    # Arrange
    monkeypatch.setenv("MIRADOR_TEST_FAULT", "probe_wrong")
    # Act
    verdict = choose(q4_0_model, "auto", None)
    # Assert
    assert not verdict.use
    if expected_healthy_use(q4_0_model):  # else a known-bad rule decided before the comparison
        assert "answered wrongly" in verdict.reason


def test_when_even_the_plain_path_crashes_the_probe_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MIRADOR_TEST_FAULT", "probe_crash_all")
    cache = tmp_path / "extra_buffers.json"
    with pytest.raises(ProbeError, match=r"even without extra buffer types.*SIGSEGV"):
        choose(embedded_model_path(), "auto", cache)
    assert "verdicts" not in cache.read_text() or not json.loads(cache.read_text())["verdicts"]  # nothing cached


@pytest.mark.parametrize("setting", ["on", "off"])
def test_an_explicit_setting_runs_no_probe(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setenv("MIRADOR_TEST_FAULT", "probe_crash_all")  # any probe child would die
    verdict = choose(embedded_model_path(), setting, None)  # type: ignore[arg-type]
    assert verdict.use == (setting == "on") and verdict.source == "setting"


@pytest.mark.parametrize("extra_buffers", [True, False])
def test_the_choice_reaches_llama_model_params_use_extra_bufts(
    monkeypatch: pytest.MonkeyPatch, q4_0_model: Path, extra_buffers: bool
) -> None:
    # Arrange: see the parameters llama.cpp is called with
    seen = []
    real = ll.llama_model_load_from_file

    def spy(path: bytes, params: ll.llama_model_params) -> object:
        seen.append(params.use_extra_bufts)
        return real(path, params)

    monkeypatch.setattr(ll, "llama_model_load_from_file", spy)
    # Act
    LlamaModel(q4_0_model, extra_buffers=extra_buffers).close()
    # Assert
    assert seen == [extra_buffers]


def test_off_keeps_every_weight_out_of_the_repack_buffer(q4_0_model: Path, tmp_path: Path) -> None:
    """Observed in llama.cpp itself: with extra buffers on, Q4_0 weights go to one of them (CPU_REPACK, or AMX on
    an AMX Xeon); off, none do."""
    offered = set(extra_buffer_types())
    if not offered:
        pytest.skip("this llama.cpp build offers no extra buffer type on this CPU")
    placed = {}
    for mode in ("on", "off"):
        cmd = [sys.executable, "-m", "node.inference.probe", str(q4_0_model), "--extra-buffers", mode]
        # the placement is logged once loaded: on an AMX Xeon the repacked weights' first decode dies (#20824)
        done = subprocess.run([*cmd, "--out", str(tmp_path / f"{mode}.npy")], capture_output=True, text=True)
        line = next(x for x in done.stderr.splitlines() if x.startswith('{"weight_buffers"'))
        placed[mode] = json.loads(line)["weight_buffers"]
    assert any(placed["on"].get(kind, 0) > 0 for kind in offered)
    assert not offered & set(placed["off"])


def test_logits_comparison_needs_every_position_to_agree() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 1000)).astype(np.float32)
    assert compare_logits(ref, ref + rng.normal(scale=1e-3, size=ref.shape).astype(np.float32)) is None
    shuffled = ref.copy()
    shuffled[2] = rng.permutation(ref[2])
    assert "position 2" in (compare_logits(ref, shuffled) or "")
    assert compare_logits(ref, ref[:3]) is not None
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert compare_logits(ref, nan) == "non-finite logits"


def test_a_daemon_whose_probe_crashes_falls_back_says_why_caches_and_serves(tmp_path: Path) -> None:
    # Arrange: a fresh home (no seeded verdict), the probe's extra-buffers child dies by SIGSEGV
    home = tmp_path / "home"
    fault = {"MIRADOR_TEST_FAULT": "probe_crash"}
    # Act
    d = wait_ready(spawn_daemon(home, fault, seed_probe=False))
    try:
        status = httpx.get(f"{d.url}/v1/node/status").json()["model"]
        chat = d.chat("Hello")
    finally:
        assert d.stop() == 0
    # Assert: off, one warning naming the crash, the daemon served
    assert chat.status_code == 200, chat.text
    assert status["extra_buffers"] is False and "SIGSEGV" in status["extra_buffers_choice"]["reason"]
    warnings = [line for line in d.log().splitlines() if " WARNING " in line and "extra buffer types off" in line]
    assert len(warnings) == 1 and "SIGSEGV" in warnings[0], d.log()
    cached = json.loads((home / "cache" / "extra_buffers.json").read_text())["verdicts"]
    assert [v["use"] for v in cached.values()] == [False]
    # Act again: the next start takes the cached verdict and probes no more
    again = start_daemon(home, fault)
    try:
        assert again.chat().status_code == 200
    finally:
        assert again.stop() == 0
    assert "cached probe verdict" in again.log() and "probing llama.cpp" not in again.log()


def test_a_daemon_that_cannot_decode_at_all_refuses_to_start(tmp_path: Path) -> None:
    d = spawn_daemon(tmp_path / "home", {"MIRADOR_TEST_FAULT": "probe_crash_all"}, seed_probe=False)
    assert d.proc.wait(timeout=120) == 1
    assert "even without extra buffer types" in d.log() and "mirador doctor" in d.log()


@pytest.mark.parametrize(
    "broken",
    [
        "not json",
        "[1, 2]",
        '{"format": 1, "verdicts": [], "digests": {}}',
        '{"format": 1, "verdicts": {"KEY": {"use": "yes", "reason": 3, "facts": []}}, "digests": {}}',
        '{"format": 1, "verdicts": {}, "digests": {"PATH": {"stamp": "STAMP", "sha256": 7}}}',
    ],
    ids=["text", "list", "verdicts-list", "entry-types", "digest-type"],
)
def test_a_broken_cache_file_is_probed_again_and_rewritten(tmp_path: Path, broken: str) -> None:
    # Arrange: a cache file someone (or a full disk) mangled, shaped like the real one where it can be
    model = embedded_model_path()
    cache = tmp_path / "extra_buffers.json"
    st = model.stat()
    key = probe_key(model)
    cache.write_text(
        broken.replace("KEY", key).replace("PATH", str(model)).replace("STAMP", f"{st.st_size}:{st.st_mtime_ns}")
    )
    # Act
    verdict = choose(model, "auto", cache)
    # Assert: the probe decided afresh, and the file now holds a well-formed verdict
    assert verdict.source == "probe"
    stored = json.loads(cache.read_text())["verdicts"][key]
    assert stored["use"] is verdict.use and stored["reason"] == verdict.reason
    assert choose(model, "auto", cache).source == "cache"
