"""The embedded block store and EmbeddedStore: layout, verification on write and read, atomic export."""

import os
import stat
from pathlib import Path

import pytest

from marketplace import blockstore
from marketplace.blockstore import BlockNotFoundError, BlockStore, CorruptBlockError
from marketplace.cid import RAW, Cid
from marketplace.content_store import ContentStore, ContentStoreError, EmbeddedStore
from marketplace.unixfs import CHUNK_SIZE
from tests.marketplace.conftest import write_random


def test_put_get_has_delete_and_layout(tmp_path: Path) -> None:
    # Arrange
    store = BlockStore(tmp_path / "blocks")
    cid = Cid.for_block(b"hello", RAW)
    # Act
    first = store.put(cid, b"hello")
    again = store.put(str(cid), b"hello")
    # Assert
    path = store.path_for(cid)
    assert (first, again) == (True, False)
    assert path.name.startswith("CIQ") and path.suffix == ".data"  # base32 of the sha2-256 multihash, as flatfs
    assert path.parent.name == path.stem[-3:-1]
    assert store.has(cid) and store.get(cid) == b"hello"
    assert store.delete(cid) and not store.has(cid) and not store.delete(cid)
    with pytest.raises(BlockNotFoundError):
        store.get(cid)


def test_put_refuses_a_block_that_does_not_match(tmp_path: Path) -> None:
    # Arrange
    store = BlockStore(tmp_path / "blocks")
    cid = Cid.for_block(b"hello", RAW)
    # Act / Assert
    with pytest.raises(CorruptBlockError):
        store.put(cid, b"hellO")
    assert not store.has(cid)
    assert not list(tmp_path.rglob("*.data"))


def test_corrupt_block_is_detected_and_dropped(tmp_path: Path) -> None:
    # Arrange
    store = BlockStore(tmp_path / "blocks")
    cid = Cid.for_block(b"hello", RAW)
    store.put(cid, b"hello")
    store.path_for(cid).write_bytes(b"jello")
    # Act / Assert
    with pytest.raises(CorruptBlockError, match="corrupt"):
        store.get(cid)
    assert not store.has(cid)  # a later fetch can repair it


@pytest.mark.parametrize("profile", ["v1-raw", "v0"])
def test_add_and_fetch_round_trip(tmp_path: Path, profile: str) -> None:
    # Arrange
    src = write_random(tmp_path / "src.bin", 3 * CHUNK_SIZE + 11, seed=5)
    store: ContentStore = EmbeddedStore(tmp_path / "blocks")
    progress: list[tuple[int, int]] = []
    # Act
    added = store.add(src, profile, lambda d, t: progress.append((d, t)))  # type: ignore[arg-type]
    store.fetch(added.cid, tmp_path / "out.bin", lambda d, t: progress.append((d, t)))
    # Assert
    assert (added.size, added.profile) == (src.stat().st_size, profile)
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    assert b"".join(store.cat(added.cid)) == src.read_bytes()
    assert store.has(added.cid)
    assert progress[-1] == (added.size, added.size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks", "out.bin", "src.bin"]  # no temp file left


def test_corrupted_block_fails_fetch_and_leaves_destination_untouched(tmp_path: Path) -> None:
    # Arrange: a stored file whose last leaf gets corrupted; the destination already holds an older file
    src = write_random(tmp_path / "src.bin", 4 * CHUNK_SIZE, seed=6)
    store = EmbeddedStore(tmp_path / "blocks")
    added = store.add(src)
    last_leaf = Cid.for_block(src.read_bytes()[3 * CHUNK_SIZE :], RAW)
    path = store.blocks.path_for(last_leaf)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    dest_dir = tmp_path / "install"
    dest_dir.mkdir()
    (dest_dir / "model.bin").write_bytes(b"old version")
    # Act
    with pytest.raises(ContentStoreError, match="corrupt"):
        store.fetch(added.cid, dest_dir / "model.bin")
    with pytest.raises(BlockNotFoundError):  # dropped on detection: a later fetch can repair it
        b"".join(store.cat(added.cid))
    # Assert
    assert (dest_dir / "model.bin").read_bytes() == b"old version"
    assert [p.name for p in dest_dir.iterdir()] == ["model.bin"]  # no temp file left behind
    assert not store.has(added.cid)


def test_fetch_of_unknown_content_fails_cleanly(tmp_path: Path) -> None:
    # Arrange
    store = EmbeddedStore(tmp_path / "blocks")
    cid = Cid.for_block(b"never stored", RAW)
    # Act / Assert
    with pytest.raises(ContentStoreError, match="not in the store"):
        store.fetch(cid, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    assert not store.has(cid)


def test_an_import_syncs_once_at_the_end_not_once_per_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: count fsyncs of block files and calls of the real syncfs
    src = write_random(tmp_path / "src.bin", 20 * CHUNK_SIZE, seed=9)
    file_fsyncs: list[int] = []
    syncfs_calls: list[int] = []
    real_fsync, real_syncfs = os.fsync, blockstore._syncfs
    assert real_syncfs is not None, "Linux libc has syncfs"

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            file_fsyncs.append(fd)
        real_fsync(fd)

    def syncfs(fd: int) -> int:
        syncfs_calls.append(fd)
        return real_syncfs(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(blockstore, "_syncfs", syncfs)
    store = EmbeddedStore(tmp_path / "blocks")
    # Act
    added = store.add(src)
    # Assert: 21 blocks written, none fsynced alone, one syncfs; the file reads back whole
    assert len(list((tmp_path / "blocks").rglob("*.data"))) == 21
    assert file_fsyncs == [] and len(syncfs_calls) == 1
    assert b"".join(store.cat(added.cid)) == src.read_bytes()
