"""UnixFS files as Kubo/js-ipfs import them by default, encoded and decoded by hand (no protobuf library).

Import: fixed 256 KiB chunks, balanced DAG with at most 174 links per node, dag-pb nodes (PBNode: Links, then
Data; PBLink: Hash, Name "", Tsize) holding UnixFS `File` data (Type, filesize, blocksizes). Two profiles:

- `v1-raw`: CIDv1; leaves are raw blocks (codec 0x55) (`ipfs add --cid-version=1 --raw-leaves`)
- `v0`: CIDv0; leaves are dag-pb UnixFS File nodes wrapping the chunk (`ipfs add`, Kubo's CIDv0 default)

A one-chunk file is its leaf (v1-raw: the raw block itself). Import streams: it holds one chunk and the pending
links of each level (at most 174 per level), so memory does not grow with the file. A link's Tsize is the child
block's length plus the Tsizes of the child's own links.

Read: `walk_file` yields a file's bytes from its root, fetching blocks through a callback that verifies them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Literal, get_args

from crypto.refusal import SingleReason
from marketplace.cid import DAG_PB, RAW, SHA2_256, Cid, CidError, decode_varint, encode_varint

CHUNK_SIZE = 256 * 1024
MAX_LINKS = 174
MAX_DEPTH = 32  # a balanced tree of 174-link nodes with 256 KiB leaves is 4 levels deep at 700 GB

Profile = Literal["v1-raw", "v0"]
PROFILES: tuple[Profile, ...] = get_args(Profile)

# UnixFS Data.Type
TYPE_RAW = 0
TYPE_DIRECTORY = 1
TYPE_FILE = 2

_MH_PREFIX = b"\x12\x20"
_V1_RAW_PREFIX = b"\x01\x55" + _MH_PREFIX

Progress = Callable[[int, int], None]
"""progress(bytes_done, bytes_total); bytes_total is -1 when unknown."""


class UnixfsError(SingleReason):
    """A block that is not valid dag-pb/UnixFS, or a file DAG that does not add up."""

    REASON = "bad_dag"


@dataclass(frozen=True, slots=True)
class Block:
    """One block of a DAG: its CID and its bytes."""

    cid: Cid
    data: bytes


@dataclass(frozen=True, slots=True)
class ImportResult:
    """The root CID of an imported file, its size in bytes and the profile that made it."""

    root: Cid
    size: int
    profile: Profile


def check_profile(profile: str) -> Profile:
    """Return `profile` if it is a known chunking profile, else raise ValueError naming the choices."""
    if profile not in PROFILES:
        raise ValueError(f"unknown content profile {profile!r}; expected one of {', '.join(PROFILES)}")
    return profile


def profile_of(cid: Cid) -> Profile:
    """The import profile that produces CIDs of this shape (v0 -> `v0`, v1 -> `v1-raw`)."""
    return "v0" if cid.version == 0 else "v1-raw"


# --- encoding -------------------------------------------------------------------------------------------------

_VARINT_CACHE: dict[int, bytes] = {}


def _varint(n: int) -> bytes:
    b = _VARINT_CACHE.get(n)
    if b is None:
        b = encode_varint(n)
        if len(_VARINT_CACHE) < 4096:
            _VARINT_CACHE[n] = b
    return b


def _encode_link(cid_bytes: bytes, tsize: int) -> bytes:
    # PBLink: Hash (1), Name (2, empty string, present as go-merkledag and js @ipld/dag-pb write it), Tsize (3)
    body = b"\x0a" + _varint(len(cid_bytes)) + cid_bytes + b"\x12\x00\x18" + _varint(tsize)
    return b"\x12" + _varint(len(body)) + body


def encode_file_node(links: list[tuple[bytes, int, int]]) -> bytes:
    """dag-pb bytes of an internal UnixFS File node; each link is (binary CID, Tsize, file bytes below it)."""
    parts = [_encode_link(cid_b, tsize) for cid_b, tsize, _ in links]
    filesize = 0
    sizes = []
    for _, _, size in links:
        filesize += size
        sizes.append(b"\x20" + _varint(size))
    unixfs = b"\x08\x02\x18" + _varint(filesize) + b"".join(sizes)
    parts.append(b"\x0a" + _varint(len(unixfs)) + unixfs)
    return b"".join(parts)


def encode_file_leaf(chunk: bytes) -> bytes:
    """dag-pb bytes of a UnixFS File leaf holding `chunk` (the CIDv0 profile's leaves)."""
    n = _varint(len(chunk))
    if chunk:
        unixfs_head = b"\x08\x02\x12" + n
        unixfs_len = len(unixfs_head) + len(chunk) + 1 + len(n)
        return b"".join((b"\x0a", _varint(unixfs_len), unixfs_head, chunk, b"\x18", n))
    # an empty file: no Data field inside UnixFS, filesize 0 (QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH)
    return b"\x0a\x04\x08\x02\x18\x00"


class DagBuilder:
    """Builds the balanced DAG of one file chunk by chunk; `add_chunk` and `finish` return the finished blocks."""

    def __init__(self, profile: Profile = "v1-raw") -> None:
        self.profile = check_profile(profile)
        self._v0 = profile == "v0"
        self._node_prefix = b"" if self._v0 else b"\x01\x70"
        # levels[i]: pending links (binary CID, Tsize, file bytes) of level i (0 = leaves); made[i]: how many
        # nodes level i has produced in total (a level's only node with nothing above it is the root)
        self._levels: list[list[tuple[bytes, int, int]]] = [[]]
        self._made: list[int] = [0]
        self.size = 0
        self.chunks = 0
        self._finished = False

    def add_chunk(self, chunk: bytes) -> list[Block]:
        """Add the next chunk (every chunk but the last must be CHUNK_SIZE long); returns new blocks."""
        if self._finished:
            raise RuntimeError("DagBuilder already finished")
        out: list[Block] = []
        leaves = self._levels[0]
        if len(leaves) == MAX_LINKS:
            self._flush(0, out)
        if self._v0:
            data = encode_file_leaf(chunk)
            cid_b = _MH_PREFIX + hashlib.sha256(data).digest()
            leaves.append((cid_b, len(data), len(chunk)))
            out.append(Block(Cid(0, DAG_PB, cid_b), data))
        else:
            digest = hashlib.sha256(chunk).digest()
            cid_b = _V1_RAW_PREFIX + digest
            leaves.append((cid_b, len(chunk), len(chunk)))
            out.append(Block(Cid(1, RAW, _MH_PREFIX + digest), chunk))
        self._made[0] += 1
        self.size += len(chunk)
        self.chunks += 1
        return out

    def _flush(self, level: int, out: list[Block]) -> None:
        """Turn level's pending links into one parent node on level + 1."""
        links = self._levels[level]
        data = encode_file_node(links)
        mh = _MH_PREFIX + hashlib.sha256(data).digest()
        tsize = len(data)
        size = 0
        for _, t, s in links:
            tsize += t
            size += s
        links.clear()
        if level + 1 == len(self._levels):
            self._levels.append([])
            self._made.append(0)
        parent = self._levels[level + 1]
        if len(parent) == MAX_LINKS:
            self._flush(level + 1, out)
        cid = Cid(0, DAG_PB, mh) if self._v0 else Cid(1, DAG_PB, mh)
        parent.append((self._node_prefix + mh, tsize, size))
        self._made[level + 1] += 1
        out.append(Block(cid, data))

    def finish(self) -> tuple[list[Block], Cid]:
        """Close the DAG: returns the last blocks and the root CID (an empty input gives the empty file)."""
        if self._finished:
            raise RuntimeError("DagBuilder already finished")
        out: list[Block] = []
        if self.chunks == 0:
            out.extend(self.add_chunk(b""))
        self._finished = True
        level = 0
        while True:
            top = level == len(self._levels) - 1
            if top and self._made[level] == 1:
                cid_b = self._levels[level][0][0]
                return out, Cid.decode(cid_b)
            if self._levels[level]:
                self._flush(level, out)
            level += 1


def _read_full(src: BinaryIO, n: int) -> bytes:
    """Read up to n bytes, looping over short reads (pipes, sockets); shorter only at end of file."""
    data = src.read(n)
    if not data or len(data) == n:
        return data or b""
    parts = [data]
    got = len(data)
    while got < n:
        more = src.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def import_blocks(
    src: BinaryIO, profile: Profile = "v1-raw", progress: Progress | None = None, total: int = -1
) -> Generator[Block, None, ImportResult]:
    """Read a file object chunk by chunk and yield its blocks (leaves first); returns the ImportResult."""
    builder = DagBuilder(profile)
    while True:
        chunk = _read_full(src, CHUNK_SIZE)
        if not chunk and builder.chunks:
            break
        yield from builder.add_chunk(chunk)
        if progress is not None:
            progress(builder.size, total)
        if len(chunk) < CHUNK_SIZE:
            break
    blocks, root = builder.finish()
    yield from blocks
    return ImportResult(root, builder.size, builder.profile)


def compute_cid(src: BinaryIO, profile: Profile = "v1-raw") -> ImportResult:
    """The root CID a default Kubo/js-ipfs import of this file object would give (nothing is stored)."""
    gen = import_blocks(src, profile)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            result: ImportResult = stop.value
            return result


class StreamingImporter:
    """Push-style import for bytes arriving in arbitrary pieces (e.g. from a network stream)."""

    def __init__(self, profile: Profile = "v1-raw") -> None:
        self._builder = DagBuilder(profile)
        self._buf = bytearray()

    def write(self, data: bytes | memoryview) -> list[Block]:
        """Feed the next bytes; returns the blocks completed by them."""
        self._buf += data
        out: list[Block] = []
        if len(self._buf) >= CHUNK_SIZE:
            view = memoryview(self._buf)
            pos = 0
            while len(self._buf) - pos >= CHUNK_SIZE:
                out.extend(self._builder.add_chunk(bytes(view[pos : pos + CHUNK_SIZE])))
                pos += CHUNK_SIZE
            view.release()
            del self._buf[:pos]
        return out

    def finish(self) -> tuple[list[Block], ImportResult]:
        """Flush the last partial chunk; returns the last blocks and the ImportResult."""
        out: list[Block] = []
        if self._buf or not self._builder.chunks:
            out.extend(self._builder.add_chunk(bytes(self._buf)))
            self._buf.clear()
        blocks, root = self._builder.finish()
        out.extend(blocks)
        return out, ImportResult(root, self._builder.size, self._builder.profile)


# --- decoding -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PBLink:
    """A dag-pb link."""

    cid: Cid
    name: str | None
    tsize: int | None


@dataclass(frozen=True, slots=True)
class PBNode:
    """A decoded dag-pb node."""

    links: list[PBLink]
    data: bytes | None


@dataclass(slots=True)
class UnixfsData:
    """The UnixFS Data message of a dag-pb node (only the fields a file needs)."""

    type: int
    data: bytes = b""
    filesize: int | None = None
    blocksizes: list[int] = field(default_factory=list)


def _fields(buf: bytes, what: str) -> Iterator[tuple[int, int, int | bytes]]:
    """Protobuf fields of `buf` as (field number, wire type, value); only varint and length-delimited."""
    pos = 0
    end = len(buf)
    try:
        while pos < end:
            key, pos = decode_varint(buf, pos)
            num, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = decode_varint(buf, pos)
                yield num, wire, value
            elif wire == 2:
                length, pos = decode_varint(buf, pos)
                if pos + length > end:
                    raise UnixfsError(f"{what}: field {num} runs past the end of the block")
                yield num, wire, buf[pos : pos + length]
                pos += length
            else:
                raise UnixfsError(f"{what}: unsupported protobuf wire type {wire} (field {num})")
    except CidError as e:
        raise UnixfsError(f"{what}: {e}") from None


def decode_pbnode(block: bytes) -> PBNode:
    """Decode a dag-pb block; raises UnixfsError on anything the dag-pb spec does not allow."""
    links: list[PBLink] = []
    data: bytes | None = None
    seen_data = False
    for num, wire, value in _fields(block, "dag-pb node"):
        if num == 2 and wire == 2 and isinstance(value, bytes):
            if seen_data:
                raise UnixfsError("dag-pb node: a link after Data")
            links.append(_decode_link(value))
        elif num == 1 and wire == 2 and isinstance(value, bytes):
            if seen_data:
                raise UnixfsError("dag-pb node: Data twice")
            data, seen_data = value, True
        else:
            raise UnixfsError(f"dag-pb node: unexpected field {num} (wire type {wire})")
    return PBNode(links, data)


def _decode_link(buf: bytes) -> PBLink:
    cid: Cid | None = None
    name: str | None = None
    tsize: int | None = None
    for num, wire, value in _fields(buf, "dag-pb link"):
        if num == 1 and wire == 2 and isinstance(value, bytes) and cid is None:
            try:
                cid = Cid.decode(value)
            except CidError as e:
                raise UnixfsError(f"dag-pb link: bad Hash: {e}") from None
        elif num == 2 and wire == 2 and isinstance(value, bytes) and name is None:
            try:
                name = value.decode("utf-8")
            except UnicodeDecodeError:
                raise UnixfsError("dag-pb link: Name is not UTF-8") from None
        elif num == 3 and wire == 0 and isinstance(value, int) and tsize is None:
            tsize = value
        else:
            raise UnixfsError(f"dag-pb link: unexpected or repeated field {num} (wire type {wire})")
    if cid is None:
        raise UnixfsError("dag-pb link without a Hash")
    return PBLink(cid, name, tsize)


def decode_unixfs(buf: bytes) -> UnixfsData:
    """Decode the UnixFS Data message carried in a dag-pb node's Data field."""
    typ: int | None = None
    data = b""
    filesize: int | None = None
    blocksizes: list[int] = []
    for num, wire, value in _fields(buf, "UnixFS data"):
        if num == 1 and wire == 0 and isinstance(value, int):
            typ = value
        elif num == 2 and wire == 2 and isinstance(value, bytes):
            data = value
        elif num == 3 and wire == 0 and isinstance(value, int):
            filesize = value
        elif num == 4 and wire == 0 and isinstance(value, int):
            blocksizes.append(value)
        elif num == 4 and wire == 2 and isinstance(value, bytes):  # packed encoding, accepted when reading
            pos = 0
            while pos < len(value):
                size, pos = decode_varint(value, pos)
                blocksizes.append(size)
        elif num in (5, 6, 7, 8):  # hashType, fanout, mode, mtime: irrelevant to a file's bytes
            continue
        else:
            raise UnixfsError(f"UnixFS data: unexpected field {num} (wire type {wire})")
    if typ is None:
        raise UnixfsError("UnixFS data without a Type")
    return UnixfsData(typ, data, filesize, blocksizes)


def root_size(cid: Cid, block: bytes) -> int:
    """The file size a root block declares (a raw block is its own length)."""
    if cid.codec == RAW:
        return len(block)
    node = decode_pbnode(block)
    if node.data is None:
        raise UnixfsError(f"{cid}: dag-pb node without UnixFS data")
    fs = decode_unixfs(node.data)
    if fs.type not in (TYPE_FILE, TYPE_RAW):
        raise UnixfsError(f"{cid}: not a file (UnixFS type {fs.type})")
    return fs.filesize if fs.filesize is not None else len(fs.data)


def check_declared_size(cid: Cid, declared: int, max_bytes: int | None) -> None:
    """Refuse a file whose root declares more than `max_bytes` (UnixfsError), before any of it is walked.

    The root's size bounds everything below it: `walk_file` checks that each subtree yields exactly what its parent
    declared, so a block linked twice is counted twice."""
    if max_bytes is not None and declared > max_bytes:
        raise UnixfsError(f"{cid} declares {declared} bytes, more than the {max_bytes} expected")


def walk_file(root: Cid, get_block: Callable[[Cid], bytes]) -> Iterator[bytes]:
    """Yield a UnixFS file's bytes in order; `get_block` must return verified block bytes for a CID.

    Checks the structure as it goes: each node's blocksizes match its links and every subtree yields exactly the
    bytes its parent declared, so a DAG that does not add up raises UnixfsError instead of giving wrong bytes.
    """
    yield from _walk(root, get_block, None, 0)


def _walk(cid: Cid, get_block: Callable[[Cid], bytes], expect: int | None, depth: int) -> Iterator[bytes]:
    if depth > MAX_DEPTH:
        raise UnixfsError(f"file DAG deeper than {MAX_DEPTH} levels at {cid}")
    if cid.hash_code != SHA2_256:
        raise UnixfsError(f"unsupported hash function in {cid}")
    block = get_block(cid)
    if cid.codec == RAW:
        if expect is not None and len(block) != expect:
            raise UnixfsError(f"raw leaf {cid} holds {len(block)} bytes, its parent says {expect}")
        if block:
            yield block
        return
    if cid.codec != DAG_PB:
        raise UnixfsError(f"{cid}: codec {cid.codec_name} is not a UnixFS file block")
    node = decode_pbnode(block)
    if node.data is None:
        raise UnixfsError(f"{cid}: dag-pb node without UnixFS data")
    fs = decode_unixfs(node.data)
    if fs.type not in (TYPE_FILE, TYPE_RAW):
        raise UnixfsError(f"{cid}: not a file (UnixFS type {fs.type})")
    if node.links and len(fs.blocksizes) != len(node.links):
        raise UnixfsError(f"{cid}: {len(node.links)} links but {len(fs.blocksizes)} blocksizes")
    total = len(fs.data) + sum(fs.blocksizes)
    if fs.filesize is not None and fs.filesize != total:
        raise UnixfsError(f"{cid}: filesize {fs.filesize} but data and blocksizes add up to {total}")
    if expect is not None and total != expect:
        raise UnixfsError(f"{cid}: holds {total} bytes, its parent says {expect}")
    del block
    if fs.data:
        yield fs.data
    for link, size in zip(node.links, fs.blocksizes, strict=False):
        yield from _walk(link.cid, get_block, size, depth + 1)
