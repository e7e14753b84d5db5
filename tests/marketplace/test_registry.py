"""The local registry: trusted publishers, rollback protection, installed artifacts, the audit log."""

from pathlib import Path

import pytest

from marketplace.registry import ArtifactRecord, Registry, RollbackError

PUB = "ed25519:" + "ab" * 16


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "state.db")


def test_trust_changes_are_listed_and_audited(registry: Registry) -> None:
    registry.trust(PUB, "a2V5", "alice")
    assert [t.fingerprint for t in registry.trusted()] == [PUB]
    assert registry.untrust(PUB) is True and registry.untrust(PUB) is False
    assert registry.trusted() == []
    log = registry.audit_log()
    assert [(e.action, e.result) for e in log] == [
        ("trust-add", "ok"),
        ("trust-remove", "ok"),
        ("trust-remove", "not-trusted"),
    ]


def test_a_version_lower_than_one_seen_is_a_rollback(registry: Registry) -> None:
    # Arrange
    registry.saw("finance", PUB, "1.2.0")
    registry.saw("finance", PUB, "1.1.0")  # seeing an older one later does not lower the mark
    # Act / Assert
    registry.check_not_rollback("finance", PUB, "1.2.0")
    registry.check_not_rollback("finance", PUB, "1.10.0")
    registry.check_not_rollback("finance", "ed25519:" + "cd" * 16, "0.1.0")  # another publisher's line
    with pytest.raises(RollbackError, match=r"older than finance@1\.2\.0"):
        registry.check_not_rollback("finance", PUB, "1.2.0-rc.1")
    assert registry.highest_seen("finance", PUB) == "1.2.0"


def test_artifacts_are_found_by_name_and_version(registry: Registry, tmp_path: Path) -> None:
    for version in ("1.0.0", "1.10.0", "1.9.0"):
        registry.add(ArtifactRecord("finance", version, PUB, "adapter", "00" * 32, "bafy", str(tmp_path), 0.0))
    assert [r.version for r in registry.artifacts("finance")] == ["1.10.0", "1.9.0", "1.0.0"]
    assert registry.find("finance") is not None and registry.find("finance").version == "1.10.0"  # type: ignore[union-attr]
    assert registry.find("finance", "1.9.0") is not None and registry.find("nope") is None
