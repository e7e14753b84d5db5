"""The bulk channel: block bytes over a direct TCP connection, keyed over libp2p, sealed record by record.

Why: py-libp2p moves bytes through trio, yamux and Noise framing in Python, in 64 KiB pieces, and a fetch over it
stays CPU-bound at a fraction of the wire (docs/BENCHMARKS.md, issue 19). libp2p keeps discovery, identity and
control; the bytes of blocks go where framing is native code: a plain socket in a worker thread, each record sealed
with ChaCha20-Poly1305 (OpenSSL through `cryptography`: one call per 256 KiB block, constant time on any CPU).

How a channel opens:
1. The fetcher opens `CONTROL_PROTOCOL` on its libp2p connection to the provider (Noise-authenticated: the provider
   knows who asks and the fetcher knows who answers) and sends `bulk.open`.
2. The provider answers `bulk.ticket`: its bulk TCP port, a random 16-byte session id and a random 32-byte key,
   good for one channel within `TICKET_TTL_S`. A peer holds at most `MAX_PER_PEER` tickets and open channels
   together; when it (or everyone) holds too many, the stream is closed without a ticket and without blame (the
   fetcher falls back to the libp2p protocol). The key crossed the Noise channel only, so whoever holds it is the
   peer that asked.
3. The fetcher connects to that port at the IP address of the same libp2p connection (never to an address the
   provider names: a hostile provider cannot point it elsewhere) and sends the session id and a sealed hello. The
   provider takes the ticket only when the hello opens under its key (`MAX_HELLO_FAILURES` wrong tries end it) and
   answers with a sealed `READY`; until READY arrives the channel is not open (a provider whose channels are all
   taken closes the connection at once, and the fetcher falls back instead of losing the provider).
4. Both derive one key per direction (HKDF-SHA256 over the ticket's key, salted with the session id). A record is a
   4-byte big-endian length (the ciphertext's, checked against the limit before anything is read), then the
   ciphertext; the length is the AEAD's associated data and the nonce counts records, so a record dropped,
   reordered, replayed, cut or altered fails to open and ends the channel. Both ends bound the wait for a record's
   length (the socket's timeout) and for its body once the length came (`record_timeout`, `BLOCK_TIMEOUT_S`).

Over it the exchange is the block protocol's without acknowledgements: the fetcher sends `blocks.want` payloads
(the same strict JSON, 1-64 CIDs) and may send the next before the answers to the last have arrived; the provider
answers each CID in order with one record, `\\x01` + the block (read verified from its store) or `\\x00` (not here).
TCP's flow control is the window. The fetcher verifies every block against its CID as before, so the channel adds
confidentiality and cheap framing, never trust.

A provider that does not speak CONTROL_PROTOCOL (an older node), whose port cannot be reached (a firewall that
lets only the libp2p port in) or that is busy, is fetched from over the libp2p block protocol as before. Version 2
added READY (a version-1 fetcher would read it as an answer): the two versions do not meet, each falls back.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from libp2p.peer.id import ID

from crypto.refusal import Refused, SingleReason
from marketplace.blockstore import BlockStore
from marketplace.cid import Cid
from node.market.block_exchange import BLOCK_TIMEOUT_S, decode_want, encode_want, read_block
from node.market.rate_limit import UploadLimit
from node.p2p.framing import receive_frame, send_frame
from node.p2p.host import Libp2pStream, P2PNode

CONTROL_PROTOCOL = "/mirador/blocks-bulk/2.0.0"
OPEN = "bulk.open"
TICKET = "bulk.ticket"
MAX_CONTROL_FRAME = 512
SESSION_BYTES = 16
KEY_BYTES = 32
TAG_BYTES = 16
TICKET_TTL_S = 10.0  # an honest fetcher connects within CONNECT_TIMEOUT_S of getting one
MAX_PER_PEER = 4  # unused tickets and open channels of one peer, together
MAX_TICKETS = 256
MAX_HELLO_FAILURES = 3
CONNECT_TIMEOUT_S = 3.0  # a port that drops the SYN (a firewall) costs this much before the libp2p fallback
HELLO = b"mirador-bulk/2 hello"
READY = b"mirador-bulk/2 ready"
MAX_WANT_RECORD = 16 * 1024  # a want names at most 64 CIDs of at most 128 characters
MAX_BLOCK_RECORD = 1 + 2 * 1024 * 1024  # a tag byte and a block (UnixFS blocks are at most 256 KiB + an envelope)
HAS, HAS_NOT = b"\x01", b"\x00"
_LENGTH = struct.Struct(">I")
_RECV_CHUNK = 1 << 20
ACCEPT_RETRY_S = 0.1  # after a failed accept (out of file descriptors, say) the loop waits this long and goes on

log = logging.getLogger(__name__)


class BulkError(SingleReason):
    """The bulk channel failed: it could not open, a record did not open under its key, was too long, or the peer
    went away or stayed silent; the channel is closed."""

    REASON = "bulk_channel"


class BulkBusy(BulkError):
    """The provider holds as many tickets and channels as it gives (this peer's share, or all): no fault of the
    peer that asked, which fetches over the libp2p protocol instead."""

    REASON = "bulk_busy"


class OpenRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The payload of `bulk.open`."""

    v: Literal[1]


class TicketDoc(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The payload of `bulk.ticket`: where to connect and with what (base64)."""

    v: Literal[1]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    session: Annotated[str, msgspec.Meta(min_length=24, max_length=24)]
    key: Annotated[str, msgspec.Meta(min_length=44, max_length=44)]


def channel_keys(key: bytes, session: bytes) -> tuple[bytes, bytes]:
    """(fetcher → provider, provider → fetcher) keys of one channel."""
    okm = HKDF(hashes.SHA256(), 2 * KEY_BYTES, salt=session, info=b"mirador bulk channel v2").derive(key)
    return okm[:KEY_BYTES], okm[KEY_BYTES:]


class SealedSocket:
    """A blocking socket carrying sealed records (one direction key each, nonces counting records)."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes) -> None:
        self.sock = sock
        self._send, self._recv = ChaCha20Poly1305(send_key), ChaCha20Poly1305(recv_key)
        self._sent = self._received = 0

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return b"\0\0\0\0" + counter.to_bytes(8, "big")

    def seal(self, payload: bytes) -> bytes:
        """One record: length, then the sealed payload (advances the send counter)."""
        length = _LENGTH.pack(len(payload) + TAG_BYTES)
        sealed = self._send.encrypt(self._nonce(self._sent), payload, length)
        self._sent += 1
        return length + sealed

    def send(self, *payloads: bytes) -> None:
        """Seal and send records (in one write)."""
        try:
            self.sock.sendall(b"".join(self.seal(p) for p in payloads))
        except OSError as exc:
            raise BulkError(f"send failed: {type(exc).__name__}: {exc}") from None

    def recv(self, limit: int, deadline: float | None = None, body_s: float | None = None) -> bytes:
        """The next record's payload; BulkError if it is longer than `limit`, does not open, or is not complete by
        `deadline` (time.monotonic) or within `body_s` of its length arriving (a trickle is not a record)."""
        header = recv_exactly(self.sock, _LENGTH.size, deadline)
        (length,) = _LENGTH.unpack(header)
        if not TAG_BYTES <= length <= limit + TAG_BYTES:
            raise BulkError(f"a record of {length} bytes (at most {limit + TAG_BYTES} here)")
        if body_s is not None:
            deadline = min(deadline or math.inf, time.monotonic() + body_s)
        body = recv_exactly(self.sock, length, deadline)
        try:
            payload = self._recv.decrypt(self._nonce(self._received), body, header)
        except InvalidTag:
            raise BulkError("a record did not open under the channel's key (altered, replayed or reordered)") from None
        self._received += 1
        return payload

    def close(self) -> None:
        """Close the socket (any blocked call in another thread returns with an error)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def recv_exactly(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Exactly `n` bytes from a blocking socket (its timeout per read, and all of them by `deadline`, in
    time.monotonic, if given); BulkError if it ends or stalls first."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    per_read = sock.gettimeout()
    try:
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BulkError(f"{got} of {n} bytes by the deadline")
                sock.settimeout(left if per_read is None else min(per_read, left))
            try:
                k = sock.recv_into(view[got:], min(n - got, _RECV_CHUNK))
            except TimeoutError:
                if deadline is not None and deadline - time.monotonic() < 0.05:  # the read ran into it
                    raise BulkError(f"{got} of {n} bytes by the deadline") from None
                raise BulkError(f"nothing more received after {got} of {n} bytes") from None
            except OSError as exc:
                raise BulkError(f"receive failed: {type(exc).__name__}: {exc}") from None
            if k == 0:
                raise BulkError(f"the connection ended after {got} of {n} bytes")
            got += k
    finally:
        if deadline is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(per_read)
    return bytes(buf)


# --- provider ---------------------------------------------------------------------------------------------------


@dataclass
class _Ticket:
    peer: str
    key: bytes
    expires: float
    failures: int = 0


class BulkServer:
    """Issues tickets over libp2p and serves blocks of a BlockStore on its own TCP port, one thread per channel."""

    def __init__(
        self,
        blocks: BlockStore,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_channels: int = 16,
        idle_timeout: float = 30.0,
        hello_timeout: float = 5.0,
        record_timeout: float = 10.0,
        upload: UploadLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`idle_timeout`: the longest wait for a want; `hello_timeout`: for the session id and hello, all of it;
        `record_timeout`: for a record's body once its length came; `upload`: the node's upload cap, shared with its
        other block servers (None: no cap)."""
        self.blocks, self.host, self.requested_port, self.upload = blocks, host, port, upload
        self.idle_timeout, self.hello_timeout, self.record_timeout = idle_timeout, hello_timeout, record_timeout
        self.clock = clock
        self._slots = threading.BoundedSemaphore(max_channels)
        self._tickets: dict[bytes, _Ticket] = {}
        self._channels: dict[str, int] = {}  # open channels per peer
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        self._node: P2PNode | None = None
        # counters for status, written by several threads (under the lock)
        self.channels_served = self.blocks_served = self.channels_refused = self.busy = 0

    def _count(self, counter: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    @property
    def port(self) -> int:
        """The TCP port it listens on (after `start`)."""
        if self._listener is None:
            raise BulkError("the bulk server is not listening")
        return int(self._listener.getsockname()[1])

    def attach(self, node: P2PNode) -> None:
        """Listen, and issue tickets on `node`'s CONTROL_PROTOCOL."""
        self.start()
        self._node = node
        node.set_stream_handler(CONTROL_PROTOCOL, self.handle)

    def start(self) -> None:
        """Bind the TCP port and start accepting channels (in a daemon thread)."""
        listener = socket.create_server((self.host, self.requested_port), backlog=64)
        listener.settimeout(0.5)  # the accept loop looks at the stop flag this often
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="bulk-accept", daemon=True).start()

    def stop(self) -> None:
        """Stop accepting and close every channel."""
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def issue(self, peer: str) -> tuple[bytes, bytes]:
        """A new (session id, key) for `peer`; BulkBusy if it holds MAX_PER_PEER tickets and channels, or everyone
        MAX_TICKETS tickets."""
        now = self.clock()
        with self._lock:
            for session in [s for s, t in self._tickets.items() if t.expires <= now]:
                del self._tickets[session]
            held = sum(t.peer == peer for t in self._tickets.values()) + self._channels.get(peer, 0)
            if held >= MAX_PER_PEER:
                raise BulkBusy(f"this peer holds {held} unused tickets and open channels (at most {MAX_PER_PEER})")
            if len(self._tickets) >= MAX_TICKETS:
                raise BulkBusy(f"{MAX_TICKETS} unused tickets outstanding")
            session, key = secrets.token_bytes(SESSION_BYTES), secrets.token_bytes(KEY_BYTES)
            self._tickets[session] = _Ticket(peer, key, now + TICKET_TTL_S)
        return session, key

    async def handle(self, stream: Libp2pStream) -> None:
        """CONTROL_PROTOCOL: one `bulk.open` answered with one `bulk.ticket`; never raises (except cancellation)."""
        try:
            frame = await receive_frame(stream, {OPEN: MAX_CONTROL_FRAME}, read_timeout=5.0, frame_timeout=10.0)
            msgspec.json.decode(frame.payload, type=OpenRequest)
            session, key = self.issue(str(stream.remote_peer))
            doc = TicketDoc(1, self.port, _b64(session), _b64(key))
            await send_frame(stream, TICKET, msgspec.json.encode(doc), write_timeout=5.0, ack_timeout=5.0)
        except BulkBusy as exc:  # capacity, not misbehaviour: closed without a ticket and without blame
            self._count("busy")
            log.debug("bulk control stream: %s", exc)
        except Exception as exc:  # any peer may send anything: a refusal for this stream alone
            self._count("channels_refused")
            log.debug("bulk control stream refused: %s: %s", type(exc).__name__, exc)
            if self._node is not None:  # it costs the peer score, as on every other protocol
                reason = str(exc.reason) if isinstance(exc, Refused) else "malformed"
                self._node.refused(CONTROL_PROTOCOL, stream.remote_peer, reason)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopped.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopped.is_set():
                    return  # closed by stop()
                log.warning("bulk channel: accept failed (%s); retrying", exc)  # EMFILE and the like pass
                time.sleep(ACCEPT_RETRY_S)
                continue
            if not self._slots.acquire(blocking=False):
                self._count("channels_refused")
                sock.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(sock,), name="bulk-serve", daemon=True).start()
            except RuntimeError as exc:  # no thread to be had: this connection alone is refused
                log.warning("bulk channel: no thread to serve a connection (%s)", exc)
                self._count("channels_refused")
                sock.close()
                self._slots.release()

    def _serve(self, sock: socket.socket) -> None:
        """One channel: the hello, then wants answered until the fetcher closes, goes idle or misbehaves."""
        with self._lock:
            self._open.add(sock)
        peer = None
        try:
            sock.settimeout(self.hello_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel, peer = self._hello(sock)
            channel.send(READY)
            self._count("channels_served")
            sock.settimeout(self.idle_timeout)
            while True:
                try:
                    payload = channel.recv(MAX_WANT_RECORD, body_s=self.record_timeout)
                except BulkError:
                    return  # the fetcher is done (or gone, or trickling)
                for cid in decode_want(payload):
                    data = self._read(cid)
                    if data is None:
                        channel.send(HAS_NOT)
                        continue
                    if self.upload is not None:
                        time.sleep(self.upload.reserve(len(data)))
                    channel.send(HAS + data)
                    self._count("blocks_served")
        except Exception as exc:  # hostile bytes or a vanished fetcher: this channel alone ends
            self._count("channels_refused")
            log.debug("bulk channel ended: %s: %s", type(exc).__name__, exc)
        finally:
            with self._lock:
                self._open.discard(sock)
                if peer is not None:
                    self._channels[peer] -= 1
                    if not self._channels[peer]:
                        del self._channels[peer]
            sock.close()
            self._slots.release()

    def _hello(self, sock: socket.socket) -> tuple[SealedSocket, str]:
        """Read the session id and the sealed hello; the ticket is used up (and its peer holds a channel) only when
        the hello opens. The channel and the peer it was issued to."""
        deadline = time.monotonic() + self.hello_timeout  # the whole hello, however it trickles
        session = recv_exactly(sock, SESSION_BYTES, deadline)
        with self._lock:
            ticket = self._tickets.get(session)
        if ticket is None or ticket.expires <= self.clock():
            raise BulkError("no such ticket (or it expired)")
        send_key, recv_key = channel_keys(ticket.key, session)
        channel = SealedSocket(sock, recv_key, send_key)  # the provider sends with the provider → fetcher key
        try:
            if channel.recv(len(HELLO), deadline) != HELLO:
                raise BulkError("a hello that opens but says something else")
        except BulkError:
            with self._lock:
                ticket.failures += 1
                if ticket.failures >= MAX_HELLO_FAILURES:
                    self._tickets.pop(session, None)
            raise
        with self._lock:
            if self._tickets.pop(session, None) is None:
                raise BulkError("the ticket was used by another connection")
            if ticket.expires <= self.clock():
                raise BulkError("the ticket expired during the hello")
            self._channels[ticket.peer] = self._channels.get(ticket.peer, 0) + 1
        return channel, ticket.peer

    def _read(self, cid: Cid) -> bytes | None:
        """The verified block, or None if it is not here."""
        return read_block(self.blocks, cid)


# --- fetcher ----------------------------------------------------------------------------------------------------


class BulkChannel:
    """The fetcher's end: send wants, read answers (blocking: run it in a worker thread)."""

    def __init__(self, sealed: SealedSocket, peer: str, record_s: float = BLOCK_TIMEOUT_S) -> None:
        """`record_s`: the longest wait for an answer's body once its length came (the wait for the length is the
        socket's timeout): a provider that trickles is cut off, not waited for."""
        self.sealed, self.peer, self.record_s = sealed, peer, record_s

    def want(self, cids: Collection[Cid]) -> None:
        """Ask for `cids` (1 to 64); the answers come in order."""
        self.sealed.send(encode_want(cids))

    def answer(self) -> bytes | None:
        """The next answer: a block's bytes (unverified), or None if the provider does not have it."""
        payload = self.sealed.recv(MAX_BLOCK_RECORD, body_s=self.record_s)
        if payload[:1] == HAS:
            return payload[1:]
        if payload == HAS_NOT:
            return None
        raise BulkError("an answer that is neither a block nor 'not here'")

    def close(self) -> None:
        """Close the connection."""
        self.sealed.close()


async def open_channel(node: P2PNode, peer: ID, *, timeout: float = 10.0) -> BulkChannel:
    """A bulk channel to `peer` (connected over libp2p); BulkError if it does not speak CONTROL_PROTOCOL, gives no
    ticket, or its port does not answer the hello with READY within `timeout`."""
    try:
        with trio.fail_after(timeout):
            stream = await node.open_stream(peer, CONTROL_PROTOCOL)
            try:
                await send_frame(stream, OPEN, msgspec.json.encode(OpenRequest(1)), write_timeout=5.0, ack_timeout=5.0)
                frame = await receive_frame(stream, {TICKET: MAX_CONTROL_FRAME}, read_timeout=5.0)
                address = stream.remote_address
            finally:
                with contextlib.suppress(Exception):
                    await stream.close()
            ticket = msgspec.json.decode(frame.payload, type=TicketDoc)
            session, key = base64.b64decode(ticket.session, validate=True), base64.b64decode(ticket.key, validate=True)
            if address is None or len(session) != SESSION_BYTES or len(key) != KEY_BYTES:
                raise BulkError("no address for the connection, or a malformed ticket")
            connect_s = min(timeout, CONNECT_TIMEOUT_S)
            return await trio.to_thread.run_sync(  # bounded by connect_s + timeout; not abandoned: it owns a socket
                _connect, address[0], ticket.port, session, key, connect_s, timeout, str(peer)
            )
    except BulkError:
        raise
    except Exception as exc:
        raise BulkError(f"{type(exc).__name__}: {exc}") from None


def _connect(
    host: str, port: int, session: bytes, key: bytes, connect_s: float, timeout: float, peer: str
) -> BulkChannel:
    """Connect (within `connect_s`), send the session id and the sealed hello, and wait for READY (within
    `timeout`, as every later read)."""
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=connect_s)
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send_key, recv_key = channel_keys(key, session)
    sealed = SealedSocket(sock, send_key, recv_key)
    try:
        sock.sendall(session + sealed.seal(HELLO))
        if sealed.recv(len(READY), deadline) != READY:
            raise BulkError("the provider's first record is not READY")
    except OSError as exc:
        sealed.close()
        raise BulkError(f"hello not sent: {exc}") from None
    except BulkError:
        sealed.close()
        raise
    return BulkChannel(sealed, peer)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
