"""A small seeded run of bench/fuzz.py against a real daemon (the full 10,000-message run is the bench): every protocol
gets malformed and adversarial messages; the daemon survives, no handler fails with an unexpected exception, the API
never answers 5xx, and afterwards the node still chats and serves its blocks (issue 14, fuzzing)."""

from pathlib import Path

import pytest

from bench.fuzz import PROTOCOLS, run_fuzz

pytestmark = pytest.mark.slow  # a daemon and a few hundred hostile messages


def test_a_seeded_fuzz_run_leaves_the_node_serving(tmp_path: Path) -> None:
    # Act
    report = run_fuzz(tmp_path, messages=100 * len(PROTOCOLS), seed=11)

    # Assert
    assert report["alive"] and report["chat_status"] == 200 and report["after_error"] == ""
    assert report["blocks_served"] and report["dht_answers"]
    assert report["handler_errors"] == [], report["handler_errors"]
    assert not any(k.endswith("handler_error") for k in report["stream_refusals"]), report["stream_refusals"]
    counts = report["per_protocol"]
    assert {p: counts[p]["sent"] for p in PROTOCOLS} == dict.fromkeys(PROTOCOLS, 100)
    assert "5xx" not in counts["http"] and not any(k.startswith("transport") for k in counts["http"]), counts["http"]
    assert sum(counts["fed.join"].get(k, 0) for k in ("answered", "closed")) > 50, counts["fed.join"]
