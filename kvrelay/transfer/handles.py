"""An endpoint's handle table: every transfer handle it opened and has not seen released.

Owns: opening handles (the one place an endpoint constructs a `Handle`, with the driver its data mover
hands over), the registry of open handles (a leak count for tests and metrics), failing the handles of a
lost peer, and the deadline sweep the control thread runs.
Must not touch: how bytes move (mover.py and the transports), sockets, peers' records (control_plane.py).

Thread safety: every method may be called from any thread; handles' callbacks run without its lock held.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable

from kvrelay.transfer.base import XferState
from kvrelay.transfer.handle import Handle

if TYPE_CHECKING:
    from kvrelay.transfer.control import PeerConn


class HandleTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Handle] = set()

    def open(self, peer: str, op: str, nbytes: int, timeout: float, conn: PeerConn | None,
             poll: Callable[[], None] | None = None,
             progress: Callable[[float], None] | None = None,
             abort: Callable[[XferState], None] | None = None,
             free: Callable[[], None] | None = None, started: float | None = None) -> Handle:
        """A new handle (PENDING, its deadline ``timeout`` after ``started``, default now) registered until it
        is released."""
        handle = Handle(peer, op, nbytes, timeout, poll, progress, abort, free, self._released, conn, started)
        with self._lock:
            self._open.add(handle)
        return handle

    def _released(self, handle: Handle) -> None:
        with self._lock:
            self._open.discard(handle)

    def fail_on(self, conn: PeerConn, reason: str) -> None:
        """Fail every open handle that runs on ``conn`` (its peer was lost)."""
        with self._lock:
            handles = [h for h in self._open if h.conn is conn]
        for h in handles:
            h.fail(reason)

    def sweep(self) -> int:
        """Expire overdue handles; return the poll timeout (ms) until the next deadline (at most 1 s)."""
        now = time.monotonic()
        nxt = now + 1.0
        with self._lock:
            handles = [h for h in self._open if not h.done]
        for h in handles:
            if not h.expire_if_due(now):
                nxt = min(nxt, h.deadline)
        return max(1, int((nxt - now) * 1000) + 1)

    def release_all(self) -> None:
        with self._lock:
            handles = list(self._open)
        for h in handles:
            h.release()

    def __len__(self) -> int:
        return len(self._open)
