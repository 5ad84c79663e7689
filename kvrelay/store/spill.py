"""Background write-behind of committed chunks to the SSD tier (one thread; publishers never wait for it),
done while the control plane is quiet (spill_quiet), within spill_max_delay of each commit.

Owns: the spill loop.  Must not touch: the record format (ssd_format.py) or admission rules (core.py).
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
from typing import TYPE_CHECKING

from kvrelay.store.index import State
from kvrelay.store.pool import align_up
from kvrelay.store.ssd import SsdFullError
from kvrelay.transfer.wire import checksum

if TYPE_CHECKING:
    from kvrelay.store.core import StoreCore

log = logging.getLogger("kvrelay.store")


# Write-behind when quiet.  On this VM a spill's O_DIRECT writes slowed concurrent pool copies by about 30%
# (batched shm pulls 7.9 -> 5.6 GB/s), and on any machine they take memory bandwidth from the transfers
# that a decode is waiting for.  So the spiller waits for spill_quiet seconds (config, default 0.05)
# without a request on the control plane, but never longer than spill_max_delay after the commit, nor while
# the chunks waiting for it fill more than SPILL_BACKLOG_SHARE of the pool (eviction needs clean chunks).
SPILL_BACKLOG_SHARE = 0.25
_POLL_S = 0.01


def _wait_for_quiet(core: "StoreCore", committed_at: float) -> None:
    limit, quiet = core.cfg.spill_max_delay, core.cfg.spill_quiet
    while limit > 0:
        now = time.monotonic()
        if (now - core.last_activity >= quiet or now - committed_at >= limit
                or core.spill_backlog > SPILL_BACKLOG_SHARE * core.arena.capacity or core.closing):
            return
        time.sleep(_POLL_S)


def spill_loop(core: "StoreCore", q: "queue.SimpleQueue[tuple[str, float, int] | None]") -> None:
    while (item := q.get()) is not None:
        kid, committed_at, nbytes = item
        _wait_for_quiet(core, committed_at)
        with core.lock:
            core.spill_backlog -= nbytes
            e = core.ix.get(kid)
            if e is None or e.offset < 0 or e.ssd is not None or e.state is not State.READY:
                continue
            e.spilling = True
            view = core.pool.view[e.offset:e.offset + align_up(e.nbytes)]
        loc = None
        if not e.verified and not _verified(core, e, view):
            view.release()
            continue
        try:
            loc, evicted = core.ssd.append(e.key, e.header, view)
        except SsdFullError as exc:
            evicted = exc.evicted
            _failed(core, e, exc)
        except Exception as exc:  # noqa: BLE001 - the spiller must outlive any single bad write
            evicted = []
            _failed(core, e, exc)
        finally:
            view.release()
        with core.lock:
            e.spilling = False
            for k in evicted:
                v = core.ix.get(k)
                if v is not None and v.ssd is not None and (loc is None or v.ssd.seg != loc.seg):
                    core.ix.set_ssd(v, None)
                    core.counters["evictions_ssd"] += 1
                    if v.offset < 0:
                        core.ix.remove(v)
            if loc is None:
                continue
            if core.ix.get(kid) is e:
                core.ix.set_ssd(e, loc)
            else:
                core.ssd.drop(e.key, loc)


def _failed(core: "StoreCore", e, exc: BaseException) -> None:
    with core.lock:
        core.counters["spill_errors"] += 1
        core.last_spill_error = f"{type(exc).__name__}: {exc}"
    log.warning("spill of %s failed: %s", e.kid, exc)


def _verified(core: "StoreCore", e, view: memoryview) -> bool:
    """Re-hash a chunk committed without verification; drop it on a mismatch."""
    got = checksum(view[:e.nbytes])
    with core.lock:
        if got == e.header.checksum:
            e.verified = True
            return True
        e.spilling = False
        core.counters["checksum_failures"] += 1
        if core.ix.get(e.kid) is e and e.pins == 0:
            core._drop(e)
    log.warning("chunk %s does not match its checksum (header %#018x, pool %#018x): dropped before spilling; "
                "its publisher wrote the slot wrongly", e.kid, e.header.checksum, got)
    return False
