"""The embedded block store: one file per block under a folder (MIRADOR_HOME/blocks), addressed by multihash.

Layout (as go-ds-flatfs "next-to-last/2"): `<root>/<XY>/<KEY>.data`, KEY = base32 upper (no padding) of the
block's multihash, XY = the next-to-last two characters of KEY. Blocks are keyed by multihash, so the same bytes
stored as raw and as dag-pb are one file.

Every block is verified against its CID before it is written and again when it is read; a block that fails the
check on read is removed (so fetching it again repairs the store) and the read raises CorruptBlockError.
Writes are atomic (temp file + rename). A write is durable at once (fsync before the rename) unless its caller
stores many blocks in a row and asks for `durable=False`: then `sync()`, called once at the end (an import, a
fetch), makes them all durable with one syncfs of the store's file system (a 100 MB import did 720 fsyncs; with
one sync at the end it was 2.0× faster, docs/BENCHMARKS.md). A block torn by a crash before that sync does not
hash to its CID: reads refuse it and drop it, so the next fetch fills it again. `sync()` also fsyncs the shard
folders written since the last call.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, cast

from crypto.refusal import SingleReason
from marketplace.cid import DAG_PB, RAW, Cid, CidError
from marketplace.unixfs import Progress, UnixfsError, check_declared_size, decode_pbnode, root_size, walk_file


class Hasher(Protocol):
    """What write_atomically feeds: a hashlib object."""

    def update(self, data: bytes, /) -> None:
        """Add `data` to the digest."""


class BlockNotFoundError(LookupError):
    """The store holds no block for a CID."""


class CorruptBlockError(SingleReason):
    """A stored or received block does not hash to its CID."""

    REASON = "corrupt_block"


def _key(cid: Cid) -> str:
    return base64.b32encode(cid.multihash).decode("ascii").rstrip("=")


class BlockStore:
    """Blocks by CID in sharded files under `root` (created on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._dirty: set[Path] = set()
        self._unsynced: list[Path] = []  # blocks written with durable=False since the last sync

    def path_for(self, cid: Cid) -> Path:
        """Where the block of `cid` lives (whether or not it is there)."""
        key = _key(cid)
        return self.root / key[-3:-1] / f"{key}.data"

    def has(self, cid: Cid | str) -> bool:
        """Whether the block of `cid` is stored (not verified)."""
        return self.path_for(Cid.of(cid)).is_file()

    def put(self, cid: Cid | str, data: bytes | memoryview) -> bool:
        """Verify `data` against `cid` and store it; False when it was already stored."""
        cid = Cid.of(cid)
        try:
            cid.verify(data)
        except CidError as e:
            raise CorruptBlockError(str(e)) from None
        return self.put_verified(cid, data)

    def put_verified(self, cid: Cid, data: bytes | memoryview, durable: bool = True) -> bool:
        """Store a block its caller has just hashed itself (the importer, a fetch); False when it was already stored.
        `durable=False`: no fsync now, the caller calls `sync()` once it has written them all."""
        path = self.path_for(cid)
        if path.is_file():
            return False
        shard = path.parent
        if not shard.is_dir():
            shard.mkdir(parents=True, exist_ok=True)
            self._dirty.add(self.root)
        tmp = shard / f".tmp-{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        self._dirty.add(shard)
        if not durable:
            self._unsynced.append(path)
        return True

    def get(self, cid: Cid | str) -> bytes:
        """The verified bytes of a block; raises BlockNotFoundError or CorruptBlockError (and drops the block)."""
        cid = Cid.of(cid)
        path = self.path_for(cid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlockNotFoundError(f"block {cid} is not in the store ({self.root})") from None
        try:
            cid.verify(data)
        except CidError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise CorruptBlockError(f"stored block {cid} is corrupt ({path}); it was removed") from None
        return data

    def delete(self, cid: Cid | str) -> bool:
        """Remove a block; False when it was not there."""
        path = self.path_for(Cid.of(cid))
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        self._dirty.add(path.parent)
        return True

    def sync(self) -> None:
        """Make the blocks written with durable=False durable (one syncfs), then fsync the folders written since the
        last sync, so that the renames survive a crash."""
        files, self._unsynced = self._unsynced, []
        if files:
            sync_files(self.root, files)
        for folder in sorted(self._dirty, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(FileNotFoundError):
                fsync_path(folder)
        self._dirty.clear()

    def missing(self, root: Cid | str) -> list[Cid]:
        """The blocks of a file DAG that are not stored (reads the dag-pb nodes it has, not raw leaves)."""
        out: list[Cid] = []
        stack = [Cid.of(root)]
        while stack:
            cid = stack.pop()
            if not self.has(cid):
                out.append(cid)
                continue
            if cid.codec == DAG_PB:
                try:
                    node = decode_pbnode(self.get(cid))
                except CorruptBlockError:
                    out.append(cid)
                    continue
                stack.extend(link.cid for link in reversed(node.links))
            elif cid.codec != RAW:
                raise UnixfsError(f"{cid}: codec {cid.codec_name} is not a UnixFS file block")
        return out

    def size(self, root: Cid | str) -> int:
        """The file size the root block of a stored file declares."""
        cid = Cid.of(root)
        return root_size(cid, self.get(cid))

    def cat(self, root: Cid | str) -> Iterator[bytes]:
        """The bytes of a stored file, every block verified as it is read."""
        return walk_file(Cid.of(root), self.get)

    def export(
        self,
        root: Cid | str,
        dest: Path,
        progress: Progress | None = None,
        max_bytes: int | None = None,
        hasher: Hasher | None = None,
    ) -> int:
        """Write a stored file to `dest` atomically (temp file beside it, fsync, rename); returns its size.
        `hasher` (e.g. hashlib.sha256()) is updated with the file's bytes as they are written.

        On any failure (missing or corrupt block, bad DAG, disk error) the temp file is removed and `dest` is left
        as it was.
        """
        cid = Cid.of(root)
        total = self.size(cid)
        check_declared_size(cid, total, max_bytes)  # the walk then checks that every subtree adds up to it
        return write_atomically(dest, self.cat(cid), total, progress, hasher)


def sync_files(root: Path, files: list[Path]) -> None:
    """Make `files` (all on `root`'s file system) durable: one syncfs(2) of that file system where libc has it,
    else an fsync of each."""
    fd = os.open(root, os.O_RDONLY)
    try:
        if _syncfs is not None and _syncfs(fd) == 0:
            return
    finally:
        os.close(fd)
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            fsync_path(path)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs (Linux), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return cast(Callable[[int], int], function)


_syncfs = _load_syncfs()


def write_atomically(
    dest: Path,
    chunks: Iterator[bytes],
    total: int = -1,
    progress: Progress | None = None,
    hasher: Hasher | None = None,
) -> int:
    """Write `chunks` to a temp file beside `dest`, fsync, and rename it over `dest`; returns the byte count.
    `hasher` is updated with every chunk written (the file is hashed while it is written, not read again)."""
    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.part"
    done = 0
    try:
        with open(tmp, "xb") as f:
            for chunk in chunks:
                f.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_path(dest.parent)
    return done
