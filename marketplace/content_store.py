"""The content store interface and its two backends: the embedded block store and a Kubo-compatible IPFS daemon.

Both address files by the CIDs a default Kubo/js-ipfs import gives (see `marketplace.unixfs` for the profiles),
so content published through one can be fetched through the other. Nothing is trusted: the embedded store
verifies every block, and the daemon backend recomputes CIDs locally from the bytes the daemon sends.
Fetches are atomic: the destination appears complete and verified, or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from marketplace.blockstore import BlockStore, CorruptBlockError, write_atomically
from marketplace.cid import DAG_PB, Cid, CidError
from marketplace.unixfs import (
    CHUNK_SIZE,
    Profile,
    Progress,
    StreamingImporter,
    check_declared_size,
    check_profile,
    decode_pbnode,
    import_blocks,
    profile_of,
    root_size,
    walk_file,
)


class ContentStoreError(RuntimeError):
    """The store could not add or fetch content (the message says which content and why)."""


class ContentVerificationError(ContentStoreError):
    """Content received does not match the CID it was asked for."""


@dataclass(frozen=True, slots=True)
class AddResult:
    """What `add` stored: the root CID (string), the file size and the chunking profile."""

    cid: str
    size: int
    profile: str


@runtime_checkable
class ContentStore(Protocol):
    """Files by CID; both backends implement it."""

    def add(self, path: Path, profile: Profile = "v1-raw", progress: Progress | None = None) -> AddResult:
        """Import a file; returns its root CID. `progress(bytes_done, bytes_total)` is called as it reads."""
        ...

    def fetch(self, cid: str | Cid, dest: Path, progress: Progress | None = None, max_bytes: int | None = None) -> str:
        """Write the file of `cid` to `dest` atomically, verified against the CID; returns the sha256 (hex) of the
        bytes written, hashed as they were written. A file whose root declares more than `max_bytes` is refused
        before anything is written (a DAG that links one block again and again grows with every link)."""
        ...

    def has(self, cid: str | Cid) -> bool:
        """Whether the whole file of `cid` can be read from this store without the network."""
        ...

    def cat(self, cid: str | Cid) -> Iterator[bytes]:
        """The file's bytes, each piece verified before it is yielded (for small content such as manifests)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def _file_size(f: BinaryIO) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except (OSError, AttributeError, ValueError):
        return -1


class EmbeddedStore:
    """The content store inside MIRADOR_HOME/blocks, written by the project."""

    def __init__(self, folder: Path) -> None:
        self.blocks = BlockStore(folder)

    def add(self, path: Path, profile: Profile = "v1-raw", progress: Progress | None = None) -> AddResult:
        """Import a file chunk by chunk (never whole in memory); blocks are written atomically."""
        check_profile(profile)
        with open(path, "rb") as f:
            gen = import_blocks(f, profile, progress, _file_size(f))
            put = self.blocks.put_verified
            try:
                while True:
                    block = next(gen)
                    put(block.cid, block.data, durable=False)  # one sync below
            except StopIteration as stop:
                result = stop.value
        self.blocks.sync()
        return AddResult(str(result.root), result.size, result.profile)

    def fetch(self, cid: str | Cid, dest: Path, progress: Progress | None = None, max_bytes: int | None = None) -> str:
        """Export a stored file to `dest` (temp + fsync + rename); nothing is left behind on failure; its sha256."""
        hasher = hashlib.sha256()
        try:
            self.blocks.export(Cid.of(cid), Path(dest), progress, max_bytes, hasher)
        except (CidError, CorruptBlockError, LookupError, ValueError) as e:
            raise ContentStoreError(f"cannot fetch {cid} from the embedded store: {e}") from e
        return hasher.hexdigest()

    def has(self, cid: str | Cid) -> bool:
        """Whether every block of the file is stored."""
        try:
            return not self.blocks.missing(Cid.of(cid))
        except ValueError:
            return False

    def cat(self, cid: str | Cid) -> Iterator[bytes]:
        """The file's bytes, every block verified as it is read."""
        return self.blocks.cat(Cid.of(cid))

    def close(self) -> None:
        """Nothing to release."""


class _TeeReader:
    """A read-only file object that feeds what is read into a local importer and reports progress."""

    def __init__(self, f: BinaryIO, importer: StreamingImporter, total: int, progress: Progress | None) -> None:
        self._f = f
        self._importer = importer
        self._total = total
        self._progress = progress
        self.done = 0
        self.name = getattr(f, "name", "file")

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data:
            self._importer.write(data)
            self.done += len(data)
            if self._progress is not None:
                self._progress(self.done, self._total)
        return data


class IpfsDaemonStore:
    """A Kubo-compatible daemon's RPC API (e.g. `/ip4/127.0.0.1/tcp/5001/http`) through ipfshttpclient.

    The client is constructed directly (its `connect()` refuses daemons newer than 0.7). Every add passes the
    chunker, CID version and raw-leaves setting explicitly, and the CID the daemon answers is checked against one
    computed locally from the same bytes. Fetched bytes are hashed locally as they stream in and the file is only
    renamed into place when they give the requested CID.
    """

    def __init__(self, api_multiaddr: str, timeout: float = 120.0, has_timeout_s: float = 1.0) -> None:
        import ipfshttpclient  # imported here: the embedded store must not need it

        self.api = api_multiaddr
        self.has_timeout_s = has_timeout_s
        self._client: Any = ipfshttpclient.Client(api_multiaddr, timeout=timeout, chunk_size=CHUNK_SIZE)

    def version(self) -> str:
        """The daemon's version string."""
        return str(self._client.version()["Version"])

    @staticmethod
    def _add_options(profile: Profile) -> dict[str, Any]:
        v1 = profile == "v1-raw"
        return {
            "cid_version": 1 if v1 else 0,
            "raw_leaves": v1,
            "chunker": f"size-{CHUNK_SIZE}",
            "trickle": False,
            "pin": True,
        }

    def add(self, path: Path, profile: Profile = "v1-raw", progress: Progress | None = None) -> AddResult:
        """Add a file to the daemon (pinned) and check its CID against a local computation of the same bytes."""
        check_profile(profile)
        importer = StreamingImporter(profile)
        with open(path, "rb") as f:
            reader = _TeeReader(f, importer, _file_size(f), progress)
            try:
                answer = self._client.add(reader, **self._add_options(profile))
            except Exception as e:
                raise ContentStoreError(f"IPFS daemon at {self.api} failed to add {path}: {e}") from e
            if f.read(1):
                raise ContentStoreError(f"IPFS daemon at {self.api} did not read all of {path}")
        _, local = importer.finish()
        try:
            remote = Cid.parse(str(answer["Hash"]))
        except (CidError, KeyError, TypeError) as e:
            raise ContentStoreError(f"IPFS daemon at {self.api} answered add with {answer!r}") from e
        if remote != local.root:
            raise ContentVerificationError(
                f"IPFS daemon at {self.api} gave {remote} for {path}, the local import gives {local.root} "
                f"(profile {profile})"
            )
        return AddResult(str(local.root), local.size, profile)

    def get_block(self, cid: Cid) -> bytes:
        """One block from the daemon, verified against its CID."""
        try:
            data: bytes = self._client.block.get(cid.encode())
        except Exception as e:
            raise ContentStoreError(f"IPFS daemon at {self.api} failed to give block {cid}: {e}") from e
        try:
            cid.verify(data)
        except CidError as e:
            raise ContentVerificationError(f"IPFS daemon at {self.api} sent a bad block: {e}") from None
        return data

    def put_block(self, cid: Cid, data: bytes) -> None:
        """Store one block in the daemon with the codec and CID version of `cid`, and check the CID it reports."""
        opts = {"format": cid.codec_name, "mhtype": "sha2-256", "version": cid.version}
        try:
            answer = self._client.block.put(_BytesFile(data), opts=opts)
            remote = Cid.parse(str(answer["Key"]))
        except Exception as e:
            raise ContentStoreError(f"IPFS daemon at {self.api} failed to store block {cid}: {e}") from e
        if remote.multihash != cid.multihash:
            raise ContentVerificationError(f"IPFS daemon at {self.api} stored block {cid} as {remote}")

    def fetch(self, cid: str | Cid, dest: Path, progress: Progress | None = None, max_bytes: int | None = None) -> str:
        """Stream `cat` from the daemon into a temp file beside `dest`, recomputing the CID; rename only if it matches.

        The CID is recomputed with the profile its shape implies (v0 -> `v0`, v1 -> `v1-raw`), so content the
        daemon imported with other chunking options is refused rather than trusted.
        """
        cid = Cid.of(cid)
        total = root_size(cid, self.get_block(cid))
        check_declared_size(cid, total, max_bytes)
        importer = StreamingImporter(profile_of(cid))
        hasher = hashlib.sha256()
        try:
            write_atomically(Path(dest), self._verified_stream(cid, importer), total, progress, hasher)
        except ContentStoreError:
            raise
        except (OSError, ValueError) as e:
            raise ContentStoreError(f"cannot fetch {cid} from IPFS daemon at {self.api}: {e}") from e
        return hasher.hexdigest()

    def _verified_stream(self, cid: Cid, importer: StreamingImporter) -> Iterator[bytes]:
        """Bytes of `cat` passed through the importer; raises at the end unless they hash to `cid`."""
        try:
            stream = self._client.cat(cid.encode(), stream=True)
        except Exception as e:
            raise ContentStoreError(f"IPFS daemon at {self.api} failed to cat {cid}: {e}") from e
        with contextlib.closing(stream):
            try:
                for piece in stream:
                    importer.write(piece)
                    yield piece
            except ContentStoreError:
                raise
            except Exception as e:
                raise ContentStoreError(f"IPFS daemon at {self.api} broke off cat {cid}: {e}") from e
        _, result = importer.finish()
        if result.root != cid:
            raise ContentVerificationError(
                f"IPFS daemon at {self.api} sent {result.size} bytes for {cid} that hash to {result.root}"
            )

    def cat(self, cid: str | Cid) -> Iterator[bytes]:
        """The file's bytes walked block by block through the daemon, each block verified before use."""
        return walk_file(Cid.of(cid), self.get_block)

    def copy_into(self, cid: str | Cid, blocks: BlockStore, progress: Progress | None = None) -> int:
        """Copy every block of a file from the daemon into an embedded block store (each verified); returns size."""
        root = Cid.of(cid)
        done = 0
        total = -1

        def get(c: Cid) -> bytes:
            nonlocal total
            data = blocks.get(c) if blocks.has(c) else self.get_block(c)
            blocks.put_verified(c, data)
            if total < 0:
                total = root_size(c, data)
            return data

        for piece in walk_file(root, get):
            done += len(piece)
            if progress is not None:
                progress(done, total)
        blocks.sync()
        return done

    def has(self, cid: str | Cid) -> bool:
        """Whether the daemon holds every block of the file locally (asked offline, each lookup bounded in time).

        js-ipfs ignores `offline` and would search the network for a missing block until the request times out,
        so each block lookup carries the daemon-side `timeout` (`has_timeout_s`).
        """
        stack = [Cid.of(cid)]
        opts = {"timeout": f"{self.has_timeout_s}s"}
        try:
            while stack:
                c = stack.pop()
                if c.codec == DAG_PB:
                    data = self._client.block.get(c.encode(), offline=True, opts=opts)
                    c.verify(data)
                    stack.extend(link.cid for link in reversed(decode_pbnode(data).links))
                else:
                    self._client.block.stat(c.encode(), offline=True, opts=opts)
        except Exception:
            return False
        return True

    def close(self) -> None:
        """Close the HTTP session."""
        with contextlib.suppress(Exception):
            self._client.close()


class _BytesFile:
    """The minimal file object ipfshttpclient streams from."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self.name = f"block-{secrets.token_hex(4)}"

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else min(len(self._data), self._pos + n)
        out = bytes(self._data[self._pos : end])
        self._pos = end
        return out
