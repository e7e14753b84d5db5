"""Scratch left behind by a killed process is removed at the next start, and nothing else is."""

from pathlib import Path

from node.core.fsutil import remove_stale


def test_remove_stale_removes_only_the_prefixed_entries(tmp_path: Path) -> None:
    # Arrange: two scratch folders (one nested), a scratch file, a symlink, and what must stay
    (tmp_path / ".fed-scratch-a" / "deep").mkdir(parents=True)
    (tmp_path / ".fed-scratch-a" / "deep" / "aggregate.bin").write_bytes(b"x" * 10)
    (tmp_path / ".fed-scratch-b").mkdir()
    (tmp_path / ".fed-scratch-c.tmp").write_text("half-written")
    keep = [tmp_path / "state.db", tmp_path / "adapters", tmp_path / "x.fed-scratch-d"]
    keep[0].write_text("db")
    keep[1].mkdir()
    keep[2].mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / ".fed-scratch-link").symlink_to(outside, target_is_directory=True)
    # Act
    removed = remove_stale(tmp_path, ".fed-scratch-")
    # Assert
    assert removed == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
    assert outside.is_dir(), "a symlinked scratch entry was followed"
    assert remove_stale(tmp_path, ".fed-scratch-") == 0
