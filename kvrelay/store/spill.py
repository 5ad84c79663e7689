"""Background write-behind of committed chunks to the SSD tier (one thread; publishers never wait for it).

Owns: the spill loop.  Must not touch: the record format (ssd_format.py) or admission rules (core.py).
A chunk being written is marked ``spilling`` so it is neither evicted nor purged meanwhile; the disk
write runs without the store lock.  A chunk whose commit was not re-hashed (a same-host publisher, see
``verify_commits``) is checked here first: a mismatch drops it and counts a checksum failure, so a bad
slot never reaches the SSD and stops being served.  (Not run at a lower CPU priority: under a publish
burst a starved spiller means dirty chunks evicted unsaved, i.e. a lost prefix cache.)  A failed write (e.g. a full disk) is counted and the chunk stays in
memory, dirty (it can still be evicted, and is then lost, counted as dropped).
"""

from __future__ import annotations

import logging
import queue
from typing import TYPE_CHECKING

from kvrelay.store.index import State
from kvrelay.store.pool import align_up
from kvrelay.store.ssd import SsdFullError
from kvrelay.transfer.wire import checksum

if TYPE_CHECKING:
    from kvrelay.store.core import StoreCore

log = logging.getLogger("kvrelay.store")


def spill_loop(core: "StoreCore", q: "queue.SimpleQueue[str | None]") -> None:
    while (kid := q.get()) is not None:
        with core.lock:
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
