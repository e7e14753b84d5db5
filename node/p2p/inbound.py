"""Inbound connection slots that come back when their connection closes (a py-libp2p 0.8.1 leak, worked around).

py-libp2p's swarm caps concurrent inbound connections with a `trio.CapacityLimiter` of
`max_connections - min_connections` slots (60 for this node's defaults). Its inbound handler takes a slot, upgrades
the connection, then waits for the *swarm* to stop before giving the slot back (`await self.manager.wait_finished()`,
a barrier that keeps trio's listener from closing the socket). So every inbound connection ever accepted holds its
slot for the swarm's lifetime, closed or not: after 60 accepted connections the node refuses every new one before
the security handshake (dialers see "failed to negotiate the secure protocol"), while the connections it dials still
work. Any long-running node with peer churn gets there; the protocol fuzzer got there in ~4,000 messages.

`hold_slots_per_connection` wraps the swarm's two methods on that path, keeping the library's own code (gate,
limiter, upgrade, registration): the upgrade reports the connection it made, and the handler is cancelled as soon as
that connection is closed, so the library's `finally` gives the slot back. The cap then bounds *concurrent* inbound
connections, as intended.
"""

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import trio
from libp2p.abc import IMuxedConn, INetwork

log = logging.getLogger(__name__)

_POLL_S = 1.0  # how often a muxer without a close event is polled for `is_closed`


class _Accepted:
    """The connection one inbound handler produced, once its upgrade finished."""

    def __init__(self) -> None:
        self.conn: IMuxedConn | None = None
        self.upgraded = trio.Event()


_current: ContextVar[_Accepted | None] = ContextVar("mirador_inbound_accepted", default=None)


async def wait_closed(conn: IMuxedConn) -> None:
    """Return once `conn` is closed (Yamux's close event, else polling `is_closed`)."""
    event = getattr(conn, "event_closed", None)
    if isinstance(event, trio.Event):
        await event.wait()
        return
    while not conn.is_closed:
        await trio.sleep(_POLL_S)


def hold_slots_per_connection(network: INetwork) -> bool:
    """Make `network`'s inbound slots last as long as their connection; False (logged) if this py-libp2p lacks the
    methods the workaround wraps, in which case the library's behaviour is left as it is."""
    handle: Callable[[Any, Any], Awaitable[None]] | None = getattr(network, "_handle_inbound_connection", None)
    upgrade: Callable[[Any, Any], Awaitable[IMuxedConn]] | None = getattr(network, "upgrade_inbound_raw_conn", None)
    if handle is None or upgrade is None:
        log.warning("p2p: this py-libp2p has no inbound handler to wrap; inbound slots may leak (see node/p2p/inbound)")
        return False

    async def upgrade_and_report(raw_conn: Any, maddr: Any) -> IMuxedConn:
        conn = await upgrade(raw_conn, maddr)
        accepted = _current.get()
        if accepted is not None:
            accepted.conn = conn
            accepted.upgraded.set()
        return conn

    async def handle_until_closed(read_write_closer: Any, maddr: Any) -> None:
        accepted = _Accepted()
        token = _current.set(accepted)
        try:
            async with trio.open_nursery() as nursery:

                async def cancel_when_closed() -> None:
                    await accepted.upgraded.wait()
                    assert accepted.conn is not None
                    await wait_closed(accepted.conn)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(cancel_when_closed)
                await handle(read_write_closer, maddr)  # returns at once if refused or the upgrade failed
                nursery.cancel_scope.cancel()
        finally:
            _current.reset(token)

    # Instance attributes shadow the class's methods; the listener looks the handler up on each connection.
    vars(network).update(upgrade_inbound_raw_conn=upgrade_and_report, _handle_inbound_connection=handle_until_closed)
    return True
