"""Block exchange between nodes: UnixFS blocks by CID over libp2p direct streams (`/mirador/blocks/1.0.0`).

On one stream the requester sends any number of `blocks.want` frames (a strict msgspec JSON list of 1-64 CIDs) and
the server answers each, in request order, with one frame per CID: `block` (the verified bytes from its store) or
`block.none`. The fetcher walks a file DAG from its root, uses the blocks it already has, and pulls the missing ones
in batches from several providers at once (one worker and one stream per provider). Every received block is hashed
against its CID before it is stored, so a hostile or broken provider can waste time but never place wrong bytes in
the store; it is dropped for the rest of the fetch and its batch goes back to the others. Verified blocks stay, so
calling `fetch_dag` again resumes.

Where the caller gives `open_bulk`, a provider is asked for a bulk channel first (node.market.bulk: the same wants
over a sealed direct connection, no acknowledgements, `PIPELINE` wants in flight, blocks verified and stored in a
worker thread); a provider without one (an older node, an unreachable port) is fetched from over this protocol.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal, Protocol

import msgspec
import trio
from libp2p.io.exceptions import IOException
from libp2p.peer.id import ID

from crypto.refusal import SingleReason
from marketplace.blockstore import BlockNotFoundError, BlockStore, CorruptBlockError
from marketplace.cid import DAG_PB, RAW, SHA2_256, Cid, CidError
from marketplace.unixfs import UnixfsError, check_declared_size, decode_pbnode, decode_unixfs, root_size
from node.market.rate_limit import UploadLimit
from node.p2p.framing import ByteStream, FrameError, FrameTimeout, FrameTruncated, receive_frame, send_frame
from node.p2p.host import P2PNode

PROTOCOL = "/mirador/blocks/1.0.0"
WANT = "blocks.want"
BLOCK = "block"
BLOCK_NONE = "block.none"
MAX_WANT_FRAME = 16 * 1024
MAX_BLOCK_FRAME = 2 * 1024 * 1024  # UnixFS blocks are at most 256 KiB plus a small dag-pb envelope
MAX_CIDS = 64
MAX_CID_CHARS = 128
WANT_LIMITS = {WANT: MAX_WANT_FRAME}
ANSWER_LIMITS = {BLOCK: MAX_BLOCK_FRAME, BLOCK_NONE: 0}
_CLOSE_TIMEOUT = 1.0
PIPELINE = 2  # wants in flight on a bulk channel: the next is asked for while the last one's blocks arrive
# A block's bytes once they begin (after the wait for its first byte, `read_timeout`): 256 KiB in 30 s is ~9 KB/s,
# slower than any uplink worth fetching from; a provider that trickles is dropped instead of holding its batch.
BLOCK_TIMEOUT_S = 30.0

log = logging.getLogger(__name__)

CidText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CID_CHARS)]


class Want(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The payload of a `blocks.want` frame."""

    v: Literal[1]
    cids: Annotated[list[CidText], msgspec.Meta(min_length=1, max_length=MAX_CIDS)]


_WANT_DECODER = msgspec.json.Decoder(Want)


class WantError(SingleReason):
    """A want that is not valid JSON, breaks the schema, or names a CID that does not parse."""

    REASON = "bad_want"


def encode_want(cids: Collection[Cid]) -> bytes:
    """The `blocks.want` payload asking for `cids` (1 to 64)."""
    if not 1 <= len(cids) <= MAX_CIDS:
        raise ValueError(f"a want names 1 to {MAX_CIDS} CIDs, got {len(cids)}")
    return msgspec.json.encode(Want(v=1, cids=[str(cid) for cid in cids]))


def decode_want(payload: bytes) -> list[Cid]:
    """The CIDs a `blocks.want` payload asks for; WantError if anything in it is off."""
    try:
        want = _WANT_DECODER.decode(payload)
        return [Cid.parse(text) for text in want.cids]
    except (msgspec.DecodeError, UnicodeDecodeError, CidError) as exc:
        raise WantError(str(exc)) from None


class BulkPipe(Protocol):
    """A provider's bulk channel as the fetcher uses it (node.market.bulk.BulkChannel); blocking calls."""

    def want(self, cids: Collection[Cid]) -> None:
        """Ask for `cids`; the answers come in order."""
        ...

    def answer(self) -> bytes | None:
        """The next answer: the block's (unverified) bytes, or None if the provider does not have it."""
        ...

    def close(self) -> None:
        """Close the channel."""
        ...


# --- server -----------------------------------------------------------------------------------------------------


class BlockServer:
    """Serves the blocks of a BlockStore to any peer that asks, each block verified as it is read from disk."""

    def __init__(
        self,
        blocks: BlockStore,
        *,
        max_streams: int = 16,
        idle_timeout: float = 30.0,
        read_timeout: float = 10.0,
        slot_timeout: float = 5.0,
        upload: UploadLimit | None = None,
    ) -> None:
        """`upload`: the node's upload cap, shared with its other block servers (None: no cap)."""
        self.blocks = blocks
        self.upload = upload
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.slot_timeout = slot_timeout
        self.limiter = trio.CapacityLimiter(max_streams)
        self.streams_served = 0
        self.blocks_served = 0
        self.streams_refused = 0  # malformed wants or frames

    def attach(self, node: P2PNode) -> None:
        """Serve PROTOCOL on `node`."""
        node.set_stream_handler(PROTOCOL, self.handle)

    async def handle(self, stream: ByteStream) -> None:
        """Answer wants on `stream` until it ends, goes idle or misbehaves; never raises (except cancellation)."""
        with trio.move_on_after(self.slot_timeout) as waiting:
            await self.limiter.acquire()
        if waiting.cancelled_caught:
            log.debug("block server: %d streams already served, refusing another", self.limiter.total_tokens)
            return
        self.streams_served += 1
        try:
            await self._serve(stream)
        except (FrameError, IOException) as exc:
            self.streams_refused += not isinstance(exc, FrameTruncated | FrameTimeout | IOException)
            log.debug("block server: stream ended: %s: %s", type(exc).__name__, exc)
        except WantError as exc:
            self.streams_refused += 1
            log.debug("block server: refused a malformed want: %s", exc)
        except Exception:  # a libp2p error or a bug: it must not reach libp2p's handler task
            log.warning("block server: unexpected error, stream dropped", exc_info=True)
        finally:
            self.limiter.release()

    async def _serve(self, stream: ByteStream) -> None:
        """The want/answer loop of one stream."""
        while True:
            frame = await receive_frame(
                stream,
                WANT_LIMITS,
                read_timeout=self.idle_timeout,
                frame_timeout=self.idle_timeout + self.read_timeout,
            )
            for cid in decode_want(frame.payload):
                data = await trio.to_thread.run_sync(self._read, cid)
                if data is not None and self.upload is not None:
                    await trio.sleep(self.upload.reserve(len(data)))
                answer = (BLOCK, data) if data is not None else (BLOCK_NONE, b"")
                await send_frame(stream, *answer, write_timeout=self.read_timeout, ack_timeout=self.read_timeout)
                self.blocks_served += data is not None

    def _read(self, cid: Cid) -> bytes | None:
        """The verified block, or None if it is not here (a corrupt one is removed by the store)."""
        return read_block(self.blocks, cid)


def read_block(blocks: BlockStore, cid: Cid) -> bytes | None:
    """A block read verified from `blocks`, or None if it is not there (a corrupt one is removed by the store)."""
    try:
        return blocks.get(cid)
    except (BlockNotFoundError, CorruptBlockError, CidError) as exc:
        log.debug("block server: no block %s: %s", cid, exc)
        return None


# --- fetcher ----------------------------------------------------------------------------------------------------


class FetchError(RuntimeError):
    """A fetch ended with blocks still missing; the message names each provider's failure."""

    def __init__(self, message: str, missing: int = 0, failures: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.missing = missing
        self.failures = dict(failures or {})


@dataclass
class FetchReport:
    """What one `fetch_dag` call did."""

    root: str
    total_bytes: int = -1
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    blocks_present: int = 0
    served: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    channels: dict[str, str] = field(default_factory=dict)  # peer -> "bulk" or "libp2p"


@dataclass
class _Scan:
    """The outcome of walking from some blocks through whatever the local store already holds."""

    missing: list[Cid] = field(default_factory=list)
    present: int = 0
    leaf_bytes: int = 0
    total: int | None = None


class _ProviderFailed(Exception):
    """The provider answered wrongly, not at all, or went away; the message is the reason to report."""


class _Fetch:
    """The shared state of one fetch: the queue of missing CIDs, batches in flight, counters and workers."""

    def __init__(
        self,
        root: Cid,
        open_stream: Callable[[ID], Awaitable[ByteStream]],
        blocks: BlockStore,
        progress: Callable[[int, int], None] | None,
        batch: int,
        read_timeout: float,
        max_bytes: int | None = None,
        open_bulk: Callable[[ID], Awaitable[BulkPipe]] | None = None,
    ) -> None:
        self.root = root
        self.open_bulk = open_bulk
        self.max_bytes = max_bytes
        self.open_stream = open_stream
        self.blocks = blocks
        self.progress = progress
        self.batch = batch
        self.read_timeout = read_timeout
        self.report = FetchReport(str(root))
        self.queue: deque[Cid] = deque()
        self.in_flight = 0
        self.workers = 1  # providers being asked (batches are sized by it)
        self.done_bytes = 0
        self.fatal: FetchError | OSError | None = None
        self._changed = trio.Event()
        self._seen: set[Cid] = set()
        self._seen_lock = threading.Lock()  # scans run in worker threads, several at a time

    # -- walking (in worker threads) --

    def _claim(self, cid: Cid) -> bool:
        """True the first time a CID is met in this fetch (a DAG may link one block many times)."""
        with self._seen_lock:
            if cid in self._seen:
                return False
            self._seen.add(cid)
            return True

    def scan(self, cids: list[Cid]) -> _Scan:
        """Walk from `cids` through the blocks already stored; collect the ones that are not."""
        out = _Scan()
        stack = [cid for cid in reversed(cids) if self._claim(cid)]
        while stack:
            cid = stack.pop()
            _check_cid(cid)
            if cid.codec == RAW and cid != self.root:
                try:
                    size = self.blocks.path_for(cid).stat().st_size  # verified again when read
                except FileNotFoundError:
                    out.missing.append(cid)
                    continue
                out.present += 1
                out.leaf_bytes += size
                continue
            try:
                data = self.blocks.get(cid)
            except (BlockNotFoundError, CorruptBlockError):  # a corrupt block was just removed: fetch it again
                out.missing.append(cid)
                continue
            out.present += 1
            links, leaf_bytes, total = self._parse(cid, data)
            out.leaf_bytes += leaf_bytes
            if total is not None:
                out.total = total
            stack.extend(link for link in reversed(links) if self._claim(link))
        return out

    def accept(self, cid: Cid, data: bytes) -> _Scan | None:
        """Verify and store a received block, then scan its links; None if the bytes are not the CID's."""
        try:
            cid.verify(data)
        except CidError:
            return None
        links, leaf_bytes, total = self._parse(cid, data)
        self.blocks.put_verified(cid, data, durable=False)  # one sync when the fetch ends (run's finally)
        out = self.scan(links)
        out.leaf_bytes += leaf_bytes
        if total is not None:
            out.total = total
        return out

    def _parse(self, cid: Cid, data: bytes) -> tuple[list[Cid], int, int | None]:
        """A verified block's links, its own file bytes, and the file size if it is the root."""
        try:
            total = root_size(cid, data) if cid == self.root else None
            if total is not None:  # the root bounds the whole file: refuse a bomb before fetching anything under it
                check_declared_size(cid, total, self.max_bytes)
        except UnixfsError as exc:
            raise FetchError(f"{self.root}: {exc}") from None
        try:
            if cid.codec == RAW:
                return [], len(data), total
            node = decode_pbnode(data)
            own = len(decode_unixfs(node.data).data) if node.data is not None else 0
        except UnixfsError as exc:
            raise FetchError(f"{self.root}: block {cid} is not part of a UnixFS file: {exc}") from None
        return [link.cid for link in node.links], own, total

    # -- scheduling (in the trio thread) --

    def _notify(self) -> None:
        """Wake every worker waiting for work or for the end."""
        self._changed.set()
        self._changed = trio.Event()

    def add(self, scan: _Scan) -> None:
        """Count a scan's results and queue what it found missing."""
        self.queue.extend(scan.missing)
        self.report.blocks_present += scan.present
        self.done_bytes += scan.leaf_bytes
        if scan.total is not None:
            self.report.total_bytes = scan.total
        if self.progress is not None and self.report.total_bytes >= 0:
            self.progress(min(self.done_bytes, self.report.total_bytes), self.report.total_bytes)
        if scan.missing:
            self._notify()

    async def take(self) -> list[Cid]:
        """The next batch to ask for; [] once nothing is queued or in flight (the fetch is complete)."""
        while True:
            if batch := self.take_now():
                return batch
            if self.in_flight == 0:
                return []
            await self._changed.wait()

    def take_now(self) -> list[Cid]:
        """The next batch if one is queued, else [] at once (every batch taken is given back with `finish`).

        Batches shrink as the queue does (guided self-scheduling: at most the queue's share of each worker's
        pipeline), so that at the end no slow provider sits on a large batch while the fast ones have nothing."""
        if not self.queue:
            return []
        self.in_flight += 1
        share = -(-len(self.queue) // (PIPELINE * max(1, self.workers)))
        return [self.queue.popleft() for _ in range(min(self.batch, share, len(self.queue)))]

    def finish(self, unanswered: list[Cid]) -> None:
        """A batch is over; CIDs it did not get go back to the front of the queue for the other providers."""
        self.queue.extendleft(reversed(unanswered))
        self.in_flight -= 1
        self._notify()

    # -- one provider --

    async def worker(self, peer: ID) -> None:
        """Pull batches from `peer` until the fetch is complete or the peer fails (then it is dropped): over a bulk
        channel where it offers one, else over a PROTOCOL stream."""
        key = str(peer)
        self.report.served.setdefault(key, 0)
        if self.open_bulk is not None:
            try:
                with trio.fail_after(self.read_timeout):
                    channel = await self.open_bulk(peer)
            except Exception as exc:
                log.debug("block fetch %s: no bulk channel to %s (%s); libp2p stream instead", self.root, key, exc)
            else:
                self.report.channels[key] = "bulk"
                await self._bulk_worker(channel, key)
                return
        self.report.channels[key] = "libp2p"
        try:
            with trio.fail_after(self.read_timeout):
                stream = await self.open_stream(peer)
        except Exception as exc:
            self._fail(key, f"no stream: {_describe(exc)}")
            return
        try:
            while wanted := await self.take():
                pending = deque(wanted)
                try:
                    await self._ask(stream, key, pending)
                except _ProviderFailed as exc:
                    self._fail(key, str(exc))
                    return
                finally:
                    self.finish(list(pending))
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT), contextlib.suppress(Exception):
                await stream.close()

    async def _ask(self, stream: ByteStream, key: str, pending: deque[Cid]) -> None:
        """Send one want and store the answers as they arrive; each answered CID leaves `pending`."""
        try:
            await send_frame(
                stream, WANT, encode_want(pending), write_timeout=self.read_timeout, ack_timeout=self.read_timeout
            )
        except Exception as exc:
            raise _ProviderFailed(f"want not accepted: {_describe(exc)}") from None
        while pending:
            cid = pending[0]
            try:
                frame = await receive_frame(
                    stream,
                    ANSWER_LIMITS,
                    read_timeout=self.read_timeout,
                    frame_timeout=self.read_timeout + BLOCK_TIMEOUT_S,
                )
            except Exception as exc:
                raise _ProviderFailed(f"no answer for {cid}: {_describe(exc)}") from None
            if frame.msg_type == BLOCK_NONE:
                raise _ProviderFailed(f"does not have block {cid}")
            scan = await trio.to_thread.run_sync(self.accept, cid, frame.payload)
            if scan is None:
                raise _ProviderFailed(f"sent bytes that do not hash to {cid} (broken or hostile)")
            pending.popleft()
            self.report.blocks_fetched += 1
            self.report.bytes_fetched += len(frame.payload)
            self.report.served[key] += 1
            self.add(scan)

    async def _bulk_worker(self, channel: BulkPipe, key: str) -> None:
        """Pull batches over a bulk channel, PIPELINE wants in flight, until the fetch is complete or it fails."""
        outstanding: deque[deque[Cid]] = deque()
        try:
            while True:
                batch = self.take_now() if outstanding else await self.take()
                if batch:
                    outstanding.append(deque(batch))
                    try:
                        await trio.to_thread.run_sync(channel.want, batch, abandon_on_cancel=True)  # type: ignore[call-arg]  # mypy misreads trio 0.35 stubs
                    except Exception as exc:
                        raise _ProviderFailed(f"want not sent: {_describe(exc)}") from None
                if not outstanding:
                    return  # complete
                if batch and len(outstanding) < PIPELINE:
                    continue
                pending = outstanding.popleft()
                try:
                    await self._receive_bulk(channel, key, pending)
                finally:
                    self.finish(list(pending))
        except _ProviderFailed as exc:
            self._fail(key, str(exc))
        finally:
            for pending in outstanding:
                self.finish(list(pending))
            with contextlib.suppress(Exception):
                channel.close()

    async def _receive_bulk(self, channel: BulkPipe, key: str, pending: deque[Cid]) -> None:
        """Read one want's answers (verified and stored in a worker thread); each stored CID leaves `pending`."""

        def receive() -> tuple[list[tuple[int, _Scan]], str]:
            got: list[tuple[int, _Scan]] = []
            for cid in list(pending):
                try:
                    data = channel.answer()
                except Exception as exc:
                    return got, f"no answer for {cid}: {_describe(exc)}"
                if data is None:
                    return got, f"does not have block {cid}"
                scan = self.accept(cid, data)
                if scan is None:
                    return got, f"sent bytes that do not hash to {cid} (broken or hostile)"
                got.append((len(data), scan))
            return got, ""

        # A cancelled fetch does not wait for the thread: the worker's `finally` closes the channel, which ends it
        got, failure = await trio.to_thread.run_sync(receive, abandon_on_cancel=True)  # type: ignore[call-arg]  # mypy misreads trio 0.35 stubs
        for size, scan in got:
            pending.popleft()
            self.report.blocks_fetched += 1
            self.report.bytes_fetched += size
            self.report.served[key] += 1
            self.add(scan)
        if failure:
            raise _ProviderFailed(failure)

    def _fail(self, key: str, reason: str) -> None:
        """Drop a provider for the rest of this fetch."""
        log.info("block fetch %s: provider %s dropped: %s", self.root, key, reason)
        self.report.failures[key] = reason

    async def run(self, providers: Sequence[ID]) -> FetchReport:
        """Scan the local store, fetch what is missing from `providers`, and return the report."""
        self.add(await trio.to_thread.run_sync(self.scan, [self.root]))
        try:
            if self.queue:
                unique = {str(peer): peer for peer in providers}
                self.workers = len(unique)
                async with trio.open_nursery() as nursery:
                    for peer in unique.values():
                        nursery.start_soon(self._guarded, peer, nursery.cancel_scope)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.blocks.sync)
        if self.fatal is not None:
            raise self.fatal
        if self.queue:
            reasons = "; ".join(f"{peer}: {why}" for peer, why in self.report.failures.items()) or "no providers"
            raise FetchError(
                f"{self.root}: {len(self.queue)} known block(s) still missing (more may lie below them); {reasons}",
                len(self.queue),
                self.report.failures,
            )
        total = self.report.total_bytes
        if self.progress is not None and self.done_bytes < total:  # blocks linked more than once count once above
            self.progress(total, total)
        return self.report

    async def _guarded(self, peer: ID, scope: trio.CancelScope) -> None:
        """Run a worker; a bad DAG or a local disk error (nobody's fault but ours) ends the whole fetch."""
        try:
            await self.worker(peer)
        except (FetchError, OSError) as exc:
            self.fatal = self.fatal or exc
            scope.cancel()


def _check_cid(cid: Cid) -> None:
    """Only sha2-256 raw and dag-pb blocks can be verified and belong to a UnixFS file."""
    if cid.hash_code != SHA2_256 or cid.codec not in (RAW, DAG_PB):
        raise FetchError(f"{cid}: a UnixFS file block must be raw or dag-pb with sha2-256 ({cid.codec_name})")


def _describe(exc: BaseException) -> str:
    """`Type: message` of an error, for failure reasons."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def fetch_dag(
    root: Cid,
    providers: Sequence[ID],
    open_stream: Callable[[ID], Awaitable[ByteStream]],
    blocks: BlockStore,
    progress: Callable[[int, int], None] | None = None,
    *,
    batch: int = 16,
    read_timeout: float = 10.0,
    max_bytes: int | None = None,
    open_bulk: Callable[[ID], Awaitable[BulkPipe]] | None = None,
) -> FetchReport:
    """Fetch every missing block of the file DAG under `root` into `blocks`, from `providers` in parallel.

    `open_stream(peer)` opens a PROTOCOL stream to a provider. `progress(done_bytes, total_bytes)` counts file bytes
    whose blocks are stored (a block the DAG links more than once counts once until the end). Raises FetchError when
    every provider has failed with blocks still missing, or when the DAG is not a UnixFS file; the blocks already
    verified stay in the store. OSError if the local store cannot be written. `open_bulk(peer)`, if given, opens a
    provider's bulk channel (raising if it has none: that provider is then fetched from over `open_stream`).
    """
    if not 1 <= batch <= MAX_CIDS:
        raise ValueError(f"batch must be 1 to {MAX_CIDS}, got {batch}")
    fetch = _Fetch(Cid.of(root), open_stream, blocks, progress, batch, read_timeout, max_bytes, open_bulk)
    return await fetch.run(providers)
