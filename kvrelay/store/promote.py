"""Background read-back of SSD-only chunks into the pool (one thread), so that a pull of a chunk that lives
only on SSD never stalls the control loop (and every other client) on the disk.

Owns: the promotion queue and thread, and how the control loop learns that a promotion finished (an
eventfd it polls, and a queue of (key id, error or None)).  Must not touch: admission rules, StoreCore's
lock, index and counters (what a finished promotion changes goes through `StoreCore.promotion_finished`,
core.py) or waiters (server.py).  While a chunk is read back it is marked ``spilling`` (busy with the
disk), so it is neither purged, deleted nor expired, and its new slot is not handed to anyone else.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvrelay.store.core import StoreCore
    from kvrelay.store.index import Entry
    from kvrelay.store.ssd import SsdTier


class Promoter:
    def __init__(self, core: StoreCore, ssd: SsdTier) -> None:
        self.core = core
        self.ssd = ssd
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.finished: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
        self._q: queue.SimpleQueue[Entry | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="kvrelay-promote", daemon=True)
        self._thread.start()

    def start(self, e: Entry, offset: int) -> None:
        """Read ``e`` back into the pool slot at ``offset`` (allocated by the caller, who holds the lock)."""
        e.promoting = offset
        e.spilling = True
        self._q.put(e)

    def _loop(self) -> None:
        core = self.core
        while (e := self._q.get()) is not None:
            off = e.promoting
            loc, header = e.ssd, e.header
            ok = loc is not None and header is not None and \
                self.ssd.read_into(loc, core.pool_slot(off, e.nbytes), header.checksum)
            err = core.promotion_finished(e, off, ok)  # None, or why its waiters get no chunk
            self.finished.put((e.kid, err))
            os.eventfd_write(self.fd, 1)

    def drain(self) -> list[tuple[str, str | None]]:
        """The promotions finished since the last call (called by the control loop when ``fd`` is readable)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        out = []
        while True:
            try:
                out.append(self.finished.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)
        os.close(self.fd)
