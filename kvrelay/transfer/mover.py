"""The data-mover interface: the one way a transport plugs how bytes move into an endpoint.

Owns: `Transfer` (a checked transfer, the plain value the endpoint hands a mover), `DataMover` (the
Protocol each transport's mover implements, checked by mypy) and `SameHostPath` (the optional fast path
for one small descriptor).  Must not touch: sockets of the control plane, peers' records, the handle
table's bookkeeping (endpoint.py, control_plane.py, handles.py do those).

How a transfer runs: the endpoint checks the peer and the descriptors, then calls ``mover.start(xfer)``.
The mover opens the transfer's handle with `Transfer.open`, handing it its driver there (``poll``,
``progress``, ``abort``, ``free``: handle.py), starts moving bytes, and returns the handle.  A handle's
callbacks are never assigned after construction.  A driver that needs the handle (to finish it from
another thread) gets it from `open`'s return value.

Peer events reach the mover from the control plane through the endpoint's hooks (on the caller's thread
or the control thread, never concurrently for the same peer): ``peer_added`` after a handshake (a refresh
of a known peer included), ``peer_lost`` once the peer is dead, restarted or disconnected (its handles
have been failed), and ``peer_region_gone`` when the peer deregistered a region.  ``close`` runs once,
after the control thread stopped and every handle was released, before the endpoint's regions are dropped.

`SameHostPath`: a mover that can finish a one-descriptor transfer on the caller's thread offers
``transfer_one``; the endpoint tries it first for a live peer and takes the general path when it
returns None.  It must make the same bounds checks as `check_descs`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Protocol

from kvrelay.transfer.base import Desc, XferState
from kvrelay.transfer.handle import check_timeout

if TYPE_CHECKING:
    from kvrelay.transfer.control import PeerConn
    from kvrelay.transfer.handle import Handle
    from kvrelay.transfer.handles import HandleTable


class Transfer:
    """A transfer the endpoint checked: a live peer, descriptors inside local and reachable remote regions,
    ``nbytes`` > 0 in all."""

    __slots__ = ("conn", "op", "descs", "nbytes", "timeout", "started", "_table")

    def __init__(self, table: HandleTable, conn: PeerConn, op: str, descs: list[Desc], nbytes: int,
                 timeout: float) -> None:
        if timeout <= 0:  # before the mover takes anything (a pooled socket) for a handle that cannot exist
            check_timeout(timeout)
        self._table = table
        self.conn = conn
        self.op = op          # "read" (remote -> local) | "write" (local -> remote)
        self.descs = descs
        self.nbytes = nbytes
        self.timeout = timeout
        self.started = time.monotonic()  # its handle's deadline counts from here, however late the mover opens it

    def open(self, *, poll: Callable[[], None] | None = None,
             progress: Callable[[float], None] | None = None,
             abort: Callable[[XferState], None] | None = None,
             free: Callable[[], None] | None = None) -> Handle:
        """The transfer's handle, registered with the endpoint, with its driver."""
        return self._table.open(self.conn.peer.name, self.op, self.nbytes, self.timeout, self.conn, poll, progress,
                                abort, free, self.started)


class DataMover(Protocol):
    """How a transport moves bytes.  Subclass it explicitly to inherit the no-op peer events."""

    def start(self, xfer: Transfer) -> Handle:
        """Open ``xfer``'s handle (`Transfer.open`), start it, return it; failures fail the handle."""
        ...

    def peer_added(self, conn: PeerConn) -> None:
        """A peer completed a handshake (or a known peer refreshed its record); raising refuses it."""
        return None

    def peer_lost(self, conn: PeerConn) -> None:
        """The peer is gone for good: drop what this mover holds for it."""
        return None

    def peer_region_gone(self, conn: PeerConn, region_id: int) -> None:
        """The peer deregistered ``region_id`` (its record no longer lists it)."""
        return None

    def close(self) -> None:
        """Stop the mover's threads and free its resources."""
        return None


class SameHostPath(Protocol):
    def transfer_one(self, conn: PeerConn, op: str, desc: Desc, timeout: float) -> Handle | None:
        """Finish a one-descriptor transfer on the caller's thread and return its handle, or None to leave
        it to the general path.  ``conn`` is live and of the caller's epoch."""
        ...
