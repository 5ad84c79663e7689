"""Background read-back of SSD-only chunks into the pool (one thread), so that a pull of a chunk that lives
only on SSD never stalls the control loop (and every other client) on the disk.

Owns: the promotion queue and thread, `PromoteJob` (the plain values of one read-back), the narrow
interface it sees of the store (`PromoteHost`, a Protocol: tiering.py implements it) and of the disk
(`SsdReader`), and how the control loop learns that a promotion finished (an eventfd it polls, and a queue
of (key id, error or None)).  Must not touch: admission rules, the store's lock, index, entries and
counters (what a finished promotion changes goes through `PromoteHost.promotion_finished`) or waiters
(server.py).  While a chunk is read back it is busy ``PROMOTING`` (lifecycle.py), so it is neither purged,
deleted nor expired, and its new slot is not handed to anyone else.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import Protocol

from kvrelay.keys import ChunkKey
from kvrelay.store.ssd_format import Loc


@dataclass(frozen=True, slots=True)
class PromoteJob:
    """An SSD-only chunk to read back into the pool slot at ``offset`` (allocated for it, busy meanwhile)."""
    kid: str
    serial: int  # which entry of that key (a later one is another chunk)
    key: ChunkKey
    nbytes: int
    loc: Loc
    checksum: int
    offset: int


class PromoteHost(Protocol):
    """What the promoter sees of the store (tiering.py `Tiering`)."""

    def pool_slot(self, offset: int, nbytes: int) -> memoryview: ...

    def promotion_finished(self, job: PromoteJob, ok: bool) -> str | None:
        """The read-back is over (checksum ``ok`` or not): None, or why the chunk's waiters get nothing."""
        ...


class SsdReader(Protocol):
    def read_into(self, loc: Loc, out: memoryview, checksum: int) -> bool: ...


class Promoter:
    def __init__(self, host: PromoteHost, ssd: SsdReader) -> None:
        self.host = host
        self.ssd = ssd
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.finished: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
        self._q: queue.SimpleQueue[PromoteJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="kvrelay-promote", daemon=True)
        self._thread.start()

    def start(self, job: PromoteJob) -> None:
        """Read the chunk back (its slot allocated and the chunk marked busy by the caller)."""
        self._q.put(job)

    def _loop(self) -> None:
        host = self.host
        while (job := self._q.get()) is not None:
            ok = self.ssd.read_into(job.loc, host.pool_slot(job.offset, job.nbytes), job.checksum)
            err = host.promotion_finished(job, ok)  # None, or why its waiters get no chunk
            self.finished.put((job.kid, err))
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
