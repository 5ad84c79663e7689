"""Background write-behind of committed chunks to the SSD tier (one thread; publishers never wait for it),
done while the control plane is quiet (spill_quiet), within spill_max_delay of each commit.

Owns: the spill loop (when to write, the disk write and its logging).  Must not touch: the record format
(ssd_format.py), admission rules or StoreCore's lock, index and counters: what a spill changes in the store
goes through StoreCore's spill_* methods (core.py), each one lock acquisition.
A chunk being written is marked ``spilling`` so it is neither evicted nor purged meanwhile; the disk
write runs without the store lock.  A chunk whose commit was not re-hashed (a same-host publisher, see
``verify_commits``) is checked here first: a mismatch drops it and counts a checksum failure, so a bad
slot never reaches the SSD and stops being served.  (Not run at a lower CPU priority: under a publish
burst a starved spiller means dirty chunks evicted unsaved, i.e. a lost prefix cache; the quiet wait is
bounded for the same reason.)  A failed write (e.g. a full disk) is counted and the chunk stays in memory,
dirty (it can still be evicted, and is then lost, counted as dropped).
"""

from __future__ import annotations

import logging
import queue
import time
from typing import TYPE_CHECKING, NamedTuple

from kvrelay.store.ssd import Loc, SsdFullError, SsdTier
from kvrelay.transfer.wire import ChunkHeader, checksum

if TYPE_CHECKING:
    from kvrelay.store.core import StoreCore
    from kvrelay.store.index import Entry

log = logging.getLogger("kvrelay.store")


# Write-behind when quiet.  On this VM a spill's O_DIRECT writes slowed concurrent pool copies by about 30%
# (batched shm pulls 7.9 -> 5.6 GB/s), and on any machine they take memory bandwidth from the transfers
# that a decode is waiting for.  So the spiller waits for spill_quiet seconds (config, default 0.05)
# without a request on the control plane, but never longer than spill_max_delay after the commit, nor while
# the chunks waiting for it fill more than SPILL_BACKLOG_SHARE of the pool (eviction needs clean chunks).
SPILL_BACKLOG_SHARE = 0.25
_POLL_S = 0.01


class Spill(NamedTuple):
    """A chunk taken for spilling (`StoreCore.spill_take`): marked ``spilling`` until `spill_written`."""
    entry: Entry
    header: ChunkHeader
    view: memoryview  # its pool slot; the spiller releases it


def _wait_for_quiet(core: StoreCore, committed_at: float) -> None:
    limit, quiet = core.cfg.spill_max_delay, core.cfg.spill_quiet
    while limit > 0:
        now = time.monotonic()
        if (now - core.last_activity >= quiet or now - committed_at >= limit
                or core.spill_backlog > SPILL_BACKLOG_SHARE * core.capacity or core.closing):
            return
        time.sleep(_POLL_S)


def spill_loop(core: StoreCore, ssd: SsdTier, q: queue.SimpleQueue[tuple[str, float, int] | None]) -> None:
    while (item := q.get()) is not None:
        kid, committed_at, nbytes = item
        _wait_for_quiet(core, committed_at)
        job = core.spill_take(kid, nbytes)
        if job is None:
            continue
        e, header, view = job
        if not e.verified and not _verified(core, e, header, view):
            view.release()
            continue
        loc: Loc | None = None
        evicted: list[str]
        try:
            loc, evicted = ssd.append(e.key, header, view, e.tenant)
        except SsdFullError as exc:
            evicted = exc.evicted
            _failed(core, e, exc)
        except Exception as exc:  # noqa: BLE001 - the spiller must outlive any single bad write
            evicted = []
            _failed(core, e, exc)
        finally:
            view.release()
        core.spill_written(e, loc, evicted)


def _failed(core: StoreCore, e: Entry, exc: BaseException) -> None:
    core.spill_failed(exc)
    log.warning("spill of %s failed: %s", e.kid, exc)


def _verified(core: StoreCore, e: Entry, header: ChunkHeader, view: memoryview) -> bool:
    """Re-hash a chunk committed without verification; the store drops it on a mismatch."""
    got = checksum(view[:e.nbytes])
    if core.spill_rehashed(e, got):
        return True
    log.warning("chunk %s does not match its checksum (header %#018x, pool %#018x): dropped before spilling; "
                "its publisher wrote the slot wrongly", e.kid, header.checksum, got)
    return False
