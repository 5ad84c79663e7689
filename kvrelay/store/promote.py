"""Background read-back of SSD-only chunks into the pool (one thread), so that a pull of a chunk that lives
only on SSD never stalls the control loop (and every other client) on the disk.

Owns: the promotion queue and thread, and how the control loop learns that a promotion finished (an
eventfd it polls, and a queue of (key id, error or None)).  Must not touch: admission rules (core.py)
or waiters (server.py).  While a chunk is read back it is marked ``spilling`` (busy with the disk), so it
is neither purged, deleted nor expired, and its new slot is not handed to anyone else.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import TYPE_CHECKING

from kvrelay.store.pool import align_up

if TYPE_CHECKING:
    from kvrelay.store.core import StoreCore
    from kvrelay.store.index import Entry


class Promoter:
    def __init__(self, core: "StoreCore") -> None:
        self.core = core
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.finished: "queue.SimpleQueue[tuple[str, str | None]]" = queue.SimpleQueue()
        self._q: "queue.SimpleQueue[Entry | None]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="kvrelay-promote", daemon=True)
        self._thread.start()

    def start(self, e: "Entry", offset: int) -> None:
        """Read ``e`` back into the pool slot at ``offset`` (allocated by the caller, who holds the lock)."""
        e.promoting = offset
        e.spilling = True
        self._q.put(e)

    def _loop(self) -> None:
        core = self.core
        while (e := self._q.get()) is not None:
            off = e.promoting
            loc = e.ssd
            ok = loc is not None and core.ssd is not None and \
                core.ssd.read_into(loc, core.pool.view[off:off + align_up(e.nbytes)], e.header.checksum)
            err = None
            with core.lock:
                e.spilling, e.promoting = False, -1
                live = core.ix.get(e.kid) is e
                if ok and live:
                    core.ix.set_memory(e, off)
                    core.counters["ssd_promotions"] += 1
                else:
                    core.arena.free(off, e.nbytes)
                    if live:  # a bad record: drop it (a record recycled meanwhile is simply gone)
                        if e.ssd is not None:
                            core.ssd.drop(e.key, e.ssd)
                        core.ix.remove(e)
                        core.counters["checksum_failures"] += 1
                        err = f"chunk {e.kid} failed its checksum on SSD and was dropped; recompute it"
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
