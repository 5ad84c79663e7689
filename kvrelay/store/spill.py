"""Background write-behind of committed chunks to the SSD tier (one thread; publishers never wait for it),
done while the control plane is quiet (spill_quiet), within spill_max_delay of each commit.

Owns: the spill loop (when to write, the disk write and its logging), `SpillJob` (the plain values of one
chunk to write) and the narrow interface it sees of the store (`SpillHost`, a Protocol: tiering.py
implements it) and of the disk (`SsdWriter`).  Must not touch: the record format (ssd_format.py),
admission rules, or the store's lock, index, entries and counters: what a spill changes in the store goes
through the `SpillHost` calls, each one lock acquisition.  A chunk being written is busy ``SPILLING``
(lifecycle.py) so it is neither evicted nor purged meanwhile; the disk write runs without the store lock.
A chunk whose commit was not re-hashed (a same-host publisher, see ``verify_commits``) is checked here
first: a mismatch drops it and counts a checksum failure, so a bad slot never reaches the SSD and stops
being served.  (Not run at a lower CPU priority: under a publish burst a starved spiller means dirty chunks
evicted unsaved, i.e. a lost prefix cache; the quiet wait is bounded for the same reason.)  A failed write
(e.g. a full disk) is counted and the chunk stays in memory, dirty (it can still be evicted, and is then
lost, counted as dropped).
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from kvrelay.keys import ChunkKey
from kvrelay.store.clock import Clock
from kvrelay.store.ssd import SsdFullError
from kvrelay.store.ssd_format import Loc
from kvrelay.transfer.wire import ChunkHeader, checksum

log = logging.getLogger("kvrelay.store")


# Write-behind when quiet.  On this VM a spill's O_DIRECT writes slowed concurrent pool copies by about 30%
# (batched shm pulls 7.9 -> 5.6 GB/s), and on any machine they take memory bandwidth from the transfers
# that a decode is waiting for.  So the spiller waits for spill_quiet seconds (config, default 0.05)
# without a request on the control plane, but never longer than spill_max_delay after the commit, nor while
# the chunks waiting for it fill more than SPILL_BACKLOG_SHARE of the pool (eviction needs clean chunks).
SPILL_BACKLOG_SHARE = 0.25
_POLL_S = 0.01


class Queued(NamedTuple):
    """A committed chunk queued for the spiller."""
    kid: str
    committed_at: float  # the store clock's monotonic time
    nbytes: int


@dataclass(frozen=True, slots=True)
class SpillJob:
    """A chunk taken for spilling (`SpillHost.spill_take`): busy ``SPILLING`` until `SpillHost.spill_written`."""
    kid: str
    serial: int  # which entry of that key (a later one is another chunk)
    key: ChunkKey
    tenant: str
    nbytes: int
    header: ChunkHeader
    rehash: bool  # committed without a re-hash: check the slot against the header before writing
    view: memoryview  # its pool slot (aligned length); the spiller releases it


@dataclass(frozen=True, slots=True)
class SpillTiming:
    max_delay: float  # spill_max_delay: the longest a chunk waits for quiet after its commit (0: never waits)
    quiet: float  # spill_quiet: how long the control plane must have been idle
    pool_bytes: int  # the pool's size (the backlog may fill SPILL_BACKLOG_SHARE of it)


class Activity(NamedTuple):
    last_request: float  # the store clock's monotonic time of the last request the server handled
    backlog: int  # bytes committed and not yet taken by the spiller
    closing: bool  # the store is closing: drain the queue without waiting


class SpillHost(Protocol):
    """What the spiller sees of the store (tiering.py `Tiering`)."""

    def activity(self) -> Activity: ...

    def spill_take(self, kid: str, nbytes: int) -> SpillJob | None:
        """Take a queued chunk (``nbytes`` leave the backlog) if it still needs writing, else None."""
        ...

    def spill_rehashed(self, job: SpillJob, got: int) -> bool:
        """The slot hashed to ``got``: True if that is its checksum, else the chunk is dropped."""
        ...

    def spill_failed(self, job: SpillJob, exc: BaseException) -> None: ...

    def spill_written(self, job: SpillJob, loc: Loc | None, evicted: list[str]) -> None:
        """Done with ``job``: on SSD at ``loc`` (None: not), and the records of ``evicted`` were reclaimed."""
        ...


class SsdWriter(Protocol):
    def append(self, key: ChunkKey, header: ChunkHeader, payload: memoryview,
               tenant: str = "") -> tuple[Loc, list[str]]: ...


def _wait_for_quiet(host: SpillHost, timing: SpillTiming, clock: Clock, committed_at: float) -> None:
    limit, quiet = timing.max_delay, timing.quiet
    while limit > 0:
        now = clock.monotonic()
        a = host.activity()
        if (now - a.last_request >= quiet or now - committed_at >= limit
                or a.backlog > SPILL_BACKLOG_SHARE * timing.pool_bytes or a.closing):
            return
        time.sleep(_POLL_S)


def spill_loop(host: SpillHost, ssd: SsdWriter, q: queue.SimpleQueue[Queued | None], timing: SpillTiming,
               clock: Clock) -> None:
    while (item := q.get()) is not None:
        _wait_for_quiet(host, timing, clock, item.committed_at)
        job = host.spill_take(item.kid, item.nbytes)
        if job is None:
            continue
        view = job.view
        if job.rehash and not _verified(host, job):
            view.release()
            continue
        loc: Loc | None = None
        evicted: list[str]
        try:
            loc, evicted = ssd.append(job.key, job.header, view, job.tenant)
        except SsdFullError as exc:
            evicted = exc.evicted
            _failed(host, job, exc)
        except Exception as exc:  # noqa: BLE001 - the spiller must outlive any single bad write
            evicted = []
            _failed(host, job, exc)
        finally:
            view.release()
        host.spill_written(job, loc, evicted)


def _failed(host: SpillHost, job: SpillJob, exc: BaseException) -> None:
    host.spill_failed(job, exc)
    log.warning("spill of %s failed: %s", job.kid, exc)


def _verified(host: SpillHost, job: SpillJob) -> bool:
    """Re-hash a chunk committed without verification; the store drops it on a mismatch."""
    got = checksum(job.view[:job.nbytes])
    if host.spill_rehashed(job, got):
        return True
    log.warning("chunk %s does not match its checksum (header %#018x, pool %#018x): dropped before spilling; "
                "its publisher wrote the slot wrongly", job.kid, job.header.checksum, got)
    return False
