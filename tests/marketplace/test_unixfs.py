"""The UnixFS importer and reader without a daemon: known CIDs, tree shapes, streaming, bounded memory."""

import io
import random
import tracemalloc
from pathlib import Path

import pytest

from marketplace import unixfs
from marketplace.cid import DAG_PB, RAW, Cid
from marketplace.unixfs import (
    CHUNK_SIZE,
    StreamingImporter,
    UnixfsError,
    compute_cid,
    decode_pbnode,
    decode_unixfs,
    import_blocks,
    walk_file,
)


def _import_all(data: bytes, profile: unixfs.Profile) -> tuple[dict[Cid, bytes], unixfs.ImportResult]:
    blocks: dict[Cid, bytes] = {}
    gen = import_blocks(io.BytesIO(data), profile)
    while True:
        try:
            block = next(gen)
        except StopIteration as stop:
            return blocks, stop.value
        blocks[block.cid] = block.data


@pytest.mark.parametrize(
    ("data", "profile", "expected"),
    [
        (b"", "v1-raw", "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"),
        (b"", "v0", "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"),
        (b"hello world", "v0", "Qmf412jQZiuVUtdgnB36FXFX7xg5V6KEbSJ4dpQuhkLyfD"),
        (b"hello world", "v1-raw", str(Cid.for_block(b"hello world", RAW))),
    ],
)
def test_known_cids(data: bytes, profile: unixfs.Profile, expected: str) -> None:
    # Act
    result = compute_cid(io.BytesIO(data), profile)
    # Assert
    assert str(result.root) == expected
    assert result.size == len(data)


def test_two_chunks_make_one_dag_pb_root_with_ordered_fields() -> None:
    # Arrange
    data = random.Random(1).randbytes(CHUNK_SIZE + 1)
    # Act
    blocks, result = _import_all(data, "v1-raw")
    # Assert
    root = blocks[result.root]
    assert result.root.version == 1 and result.root.codec == DAG_PB
    assert root.startswith(b"\x12")  # Links (field 2) come before Data (field 1)
    node = decode_pbnode(root)
    assert [link.name for link in node.links] == ["", ""]
    assert [link.tsize for link in node.links] == [CHUNK_SIZE, 1]
    fs = decode_unixfs(node.data or b"")
    assert (fs.type, fs.filesize, fs.blocksizes) == (unixfs.TYPE_FILE, CHUNK_SIZE + 1, [CHUNK_SIZE, 1])
    assert all(c.codec == RAW for c in blocks if c != result.root)


def test_deep_tree_round_trip_and_tsize(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: 3 links per node turns 10 chunks into a 3-level tree (what 174 links do at 7.9 GB)
    monkeypatch.setattr(unixfs, "MAX_LINKS", 3)
    data = random.Random(2).randbytes(9 * CHUNK_SIZE + 5)
    for profile in unixfs.PROFILES:
        # Act
        blocks, result = _import_all(data, profile)
        out = b"".join(walk_file(result.root, blocks.__getitem__))
        # Assert
        assert out == data
        root = decode_pbnode(blocks[result.root])
        assert len(root.links) == 2  # 10 leaves -> 4 parents -> 2 -> root
        total_tsize = sum(link.tsize or 0 for link in root.links)
        assert total_tsize + len(blocks[result.root]) == sum(len(b) for b in blocks.values())


@pytest.mark.parametrize("profile", unixfs.PROFILES)
def test_streaming_importer_equals_file_import(profile: unixfs.Profile) -> None:
    # Arrange
    rng = random.Random(3)
    data = rng.randbytes(3 * CHUNK_SIZE + 777)
    importer = StreamingImporter(profile)
    pushed: list[unixfs.Block] = []
    # Act
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 100_000)
        pushed.extend(importer.write(data[pos : pos + n]))
        pos += n
    last, result = importer.finish()
    pushed.extend(last)
    blocks, expected = _import_all(data, profile)
    # Assert
    assert result == expected
    assert {b.cid: b.data for b in pushed} == blocks


def test_import_reports_progress() -> None:
    # Arrange
    data = bytes(2 * CHUNK_SIZE + 3)
    seen: list[tuple[int, int]] = []
    # Act
    gen = import_blocks(io.BytesIO(data), "v1-raw", lambda done, total: seen.append((done, total)), len(data))
    for _ in gen:
        pass
    # Assert
    assert seen == [(CHUNK_SIZE, len(data)), (2 * CHUNK_SIZE, len(data)), (len(data), len(data))]


def test_unknown_profile_is_refused() -> None:
    # Act / Assert
    with pytest.raises(ValueError, match="v1-raw"):
        compute_cid(io.BytesIO(b""), "v2")  # type: ignore[arg-type]


def test_import_memory_stays_bounded(tmp_path: Path) -> None:
    # Arrange: a 50 MB file on disk
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        for i in range(50):
            f.write(random.Random(i).randbytes(1024 * 1024))
    # Act
    tracemalloc.start()
    try:
        with open(path, "rb") as f:
            compute_cid(f, "v0")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Assert: a couple of chunks, not the file
    assert peak < 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (b"\x0a\x05ab", "past the end"),
        (b"\x1a\x00", "unexpected field 3"),
        (b"\x0a\x00\x12\x00", "link after Data"),
        (b"\x12\x02\x18\x01", "without a Hash"),
        (b"\x0d\x00\x00\x00\x00", "wire type 5"),
    ],
)
def test_malformed_dag_pb_is_refused(block: bytes, message: str) -> None:
    # Act / Assert
    with pytest.raises(UnixfsError, match=message):
        decode_pbnode(block)


def test_walk_refuses_a_dag_that_does_not_add_up() -> None:
    # Arrange: a root that claims 5 bytes in one raw leaf holding 3
    leaf = b"abc"
    leaf_cid = Cid.for_block(leaf, RAW)
    root = unixfs.encode_file_node([(leaf_cid.to_bytes(), 3, 5)])
    root_cid = Cid.for_block(root, DAG_PB)
    blocks = {leaf_cid: leaf, root_cid: root}
    # Act / Assert
    with pytest.raises(UnixfsError, match="parent says 5"):
        b"".join(walk_file(root_cid, blocks.__getitem__))
