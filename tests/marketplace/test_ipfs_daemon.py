"""Against a real js-ipfs daemon: the embedded CIDs equal the daemon's, and content crosses both ways by CID."""

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from marketplace.cid import DAG_PB, Cid
from marketplace.content_store import ContentVerificationError, EmbeddedStore, IpfsDaemonStore
from marketplace.unixfs import CHUNK_SIZE, Profile, compute_cid, decode_pbnode
from tests import ipfs_daemon
from tests.ipfs_daemon import IpfsDaemon
from tests.marketplace.conftest import SAMPLE_SIZES, write_random

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # urllib3 warns about ipfshttpclient's arguments

DAEMON_ADD_OPTIONS = {
    "v1-raw": {"cid_version": 1, "raw_leaves": True},
    "v0": {"cid_version": 0, "raw_leaves": False},  # the CIDv0 defaults, spelled out
}


@pytest.fixture(scope="module")
def daemon_store(ipfs: IpfsDaemon) -> Iterator[IpfsDaemonStore]:
    """The daemon backend on the session's daemon."""
    store = IpfsDaemonStore(ipfs.api_multiaddr)
    yield store
    store.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("profile", ["v1-raw", "v0"])
@pytest.mark.parametrize("name", list(SAMPLE_SIZES))
def test_embedded_cid_equals_daemon_cid(
    daemon_store: IpfsDaemonStore, sample_files: dict[str, Path], name: str, profile: Profile
) -> None:
    # Arrange
    path = sample_files[name]
    client = daemon_store._client
    # Act: the daemon's own add (raw client call, options explicit) and the local import
    with open(path, "rb") as f:
        answer = client.add(f, chunker=f"size-{CHUNK_SIZE}", **DAEMON_ADD_OPTIONS[profile])
    with open(path, "rb") as f:
        local = compute_cid(f, profile)
    # Assert: compared as bytes (js-ipfs prints CIDv1 in base58btc)
    assert Cid.parse(answer["Hash"]) == local.root
    assert local.size == SAMPLE_SIZES[name]


@pytest.mark.parametrize("profile", ["v1-raw", "v0"])
def test_embedded_to_daemon_by_blocks(daemon_store: IpfsDaemonStore, tmp_path: Path, profile: Profile) -> None:
    # Arrange: a file the daemon has never seen, published to the embedded store only
    src = write_random(tmp_path / "src.bin", 3 * CHUNK_SIZE + 99, seed=100 + len(profile))
    embedded = EmbeddedStore(tmp_path / "blocks")
    added = embedded.add(src, profile)
    assert not daemon_store.has(added.cid)
    # Act: hand the daemon the embedded store's blocks, then fetch the file through the daemon by CID
    todo = [Cid.parse(added.cid)]
    while todo:
        cid = todo.pop()
        data = embedded.blocks.get(cid)
        daemon_store.put_block(cid, data)
        if cid.codec == DAG_PB:
            todo.extend(link.cid for link in decode_pbnode(data).links)
    progress: list[tuple[int, int]] = []
    daemon_store.fetch(added.cid, tmp_path / "out.bin", lambda d, t: progress.append((d, t)))
    raw_cat = daemon_store._client.cat(added.cid)
    # Assert
    assert daemon_store.has(added.cid)
    assert _sha256(tmp_path / "out.bin") == _sha256(src)
    assert raw_cat == src.read_bytes()
    assert progress[-1] == (added.size, added.size)


@pytest.mark.parametrize("profile", ["v1-raw", "v0"])
def test_daemon_to_embedded(daemon_store: IpfsDaemonStore, tmp_path: Path, profile: Profile) -> None:
    # Arrange: a file added through the daemon backend only
    src = write_random(tmp_path / "src.bin", 2 * CHUNK_SIZE + 7, seed=200 + len(profile))
    progress: list[tuple[int, int]] = []
    added = daemon_store.add(src, profile, lambda d, t: progress.append((d, t)))
    embedded = EmbeddedStore(tmp_path / "blocks")
    assert not embedded.has(added.cid)
    # Act: copy its blocks into the embedded store (each verified), then fetch from the embedded store alone
    copied = daemon_store.copy_into(added.cid, embedded.blocks)
    embedded.fetch(added.cid, tmp_path / "out.bin")
    # Assert
    assert copied == added.size == src.stat().st_size
    assert progress[-1] == (added.size, added.size)
    assert embedded.has(added.cid)
    assert _sha256(tmp_path / "out.bin") == _sha256(src)
    assert embedded.add(tmp_path / "out.bin", profile).cid == added.cid


def test_daemon_fetch_refuses_bytes_that_do_not_match(
    daemon_store: IpfsDaemonStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: real content, but the daemon's cat stream is tampered with on the way
    src = write_random(tmp_path / "src.bin", CHUNK_SIZE + 5, seed=300)
    added = daemon_store.add(src, "v1-raw")
    real_cat = daemon_store._client.cat

    def tampered_cat(cid: str, **kwargs: object) -> Iterator[bytes]:
        for piece in real_cat(cid, **kwargs):
            yield piece.replace(piece[:1], bytes([piece[0] ^ 1]), 1)

    monkeypatch.setattr(daemon_store._client, "cat", tampered_cat)
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"previous")
    # Act / Assert
    with pytest.raises(ContentVerificationError, match="hash to"):
        daemon_store.fetch(added.cid, dest)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "src.bin"]


def test_daemon_add_checks_the_cid_it_answers(daemon_store: IpfsDaemonStore, tmp_path: Path) -> None:
    # Arrange: a daemon answering with some other CID
    src = write_random(tmp_path / "src.bin", 10, seed=400)
    other = compute_cid(io.BytesIO(b"other"), "v1-raw").root.encode("base58btc")
    daemon_store_client = daemon_store._client
    real_add = daemon_store_client.add
    daemon_store_client.add = lambda f, **kw: {**real_add(f, **kw), "Hash": other}
    # Act / Assert
    try:
        with pytest.raises(ContentVerificationError, match="local import"):
            daemon_store.add(src, "v1-raw")
    finally:
        del daemon_store_client.add


@pytest.mark.parametrize(("ci", "outcome"), [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_missing_daemon_skips_locally_and_fails_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    # Arrange: js-ipfs "not installed"
    monkeypatch.setattr(ipfs_daemon, "JSIPFS", tmp_path / "missing" / "cli.js")
    monkeypatch.setenv("CI", ci)
    # Act / Assert
    with pytest.raises(outcome, match=r"install\.sh"):
        ipfs_daemon.require_ipfs()
