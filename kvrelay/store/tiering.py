"""The spill/promote interface: how the background threads to and from SSD (spill.py, promote.py) change
the store, and the threads' start and stop.

Owns: `Tiering`, the store's side of the `SpillHost` and `PromoteHost` Protocols (the write-behind queue
and its backlog, the spill_* calls, the start of a promotion and `promotion_finished`).  The threads get
plain values (`SpillJob`, `PromoteJob`: the chunk's id and entry serial, key, tenant, bytes, header),
never an entry or the core; each call from a thread is one lock acquisition, and finds the entry again by
id and serial (one dropped meanwhile is gone, even if its key was stored again).  Must not touch: the
threads' own logic (when to write, the disk I/O), admission, commits or pins.
"""

from __future__ import annotations

import queue
import threading

from kvrelay.store.allocation import Allocation
from kvrelay.store.errors import OpError, StoreCode
from kvrelay.store.lifecycle import Busy, Entry, Tier
from kvrelay.store.pool import align_up
from kvrelay.store.promote import PromoteJob, Promoter
from kvrelay.store.shared import CoreState
from kvrelay.store.spill import Activity, Queued, SpillJob, SpillTiming, spill_loop
from kvrelay.store.ssd import Loc, SsdTier


class Tiering:
    def __init__(self, st: CoreState, alloc: Allocation) -> None:
        self.st = st
        self.alloc = alloc
        # committed chunks for the spiller; it writes when the control plane is quiet (spill.py)
        self._spill_q: "queue.SimpleQueue[Queued | None]" = queue.SimpleQueue()
        self._spiller: threading.Thread | None = None
        self.promoter: Promoter | None = None
        self.spill_backlog = 0  # bytes committed and not yet taken by the spiller
        self.last_activity = 0.0  # the clock's monotonic time of the last request the server handled
        self.closing = False
        self.last_spill_error = ""

    def start(self, ssd: SsdTier) -> None:
        """Start the spiller and the promoter on the (recovered) SSD tier."""
        cfg = self.st.cfg
        timing = SpillTiming(cfg.spill_max_delay, cfg.spill_quiet, self.st.arena.capacity)
        self._spiller = threading.Thread(target=spill_loop, args=(self, ssd, self._spill_q, timing, self.st.clock),
                                         name="kvrelay-spill", daemon=True)
        self._spiller.start()
        self.promoter = Promoter(self, ssd)

    def close(self) -> None:
        """Stop the promoter, then let the spiller drain its queue (it stops waiting for quiet) and stop."""
        if self.promoter is not None:
            self.promoter.close()
        self.closing = True
        if self._spiller is not None:
            self._spill_q.put(None)
            self._spiller.join(timeout=10)

    # --- for the core's parts (lock held or not, as each says) -------------------------------------
    def queue_spill(self, entries: list[Entry]) -> None:
        """Queue freshly committed chunks for write-behind (no-op without an SSD tier; lock not held)."""
        if self.st.ssd is None:
            return
        now = self.st.clock.monotonic()
        with self.st.lock:
            self.spill_backlog += sum(e.nbytes for e in entries)
        for e in entries:
            self._spill_q.put(Queued(e.kid, now, e.nbytes))

    def promote(self, e: Entry) -> None:
        """Start reading an SSD-only chunk back (lock held); nothing to do if it is already on its way."""
        if e.busy is Busy.PROMOTING:
            return
        assert self.promoter is not None and e.loc is not None and e.header is not None
        off = self.alloc.alloc(e.nbytes)
        if off is None:
            raise OpError(StoreCode.FULL,
                          f"cannot bring {e.kid} back from SSD: the pool has no room (all pinned or reserved)")
        e.begin(Busy.PROMOTING, off)
        self.promoter.start(PromoteJob(e.kid, e.serial, e.key, e.nbytes, e.loc, e.header.checksum, off))

    # --- for the spiller (spill.py) and the promoter (promote.py): each call is one lock acquisition ------
    def activity(self) -> Activity:
        """How busy the control plane is (read without the lock: a stale value only delays a spill)."""
        return Activity(self.last_activity, self.spill_backlog, self.closing)

    def pool_slot(self, offset: int, nbytes: int) -> memoryview:
        """A view of the pool slot of an ``nbytes`` chunk at ``offset`` (its aligned length)."""
        return self.st.pool.view[offset:offset + align_up(nbytes)]

    def spill_take(self, kid: str, nbytes: int) -> SpillJob | None:
        """The spiller takes a queued chunk (``nbytes`` leave the backlog): if it still needs writing (ready,
        in memory, not on SSD), mark it busy ``SPILLING`` and return it with its slot's view; else None."""
        with self.st.lock:
            self.spill_backlog -= nbytes
            e = self.st.ix.get(kid)
            if e is None or e.tier is not Tier.MEMORY or e.is_busy or e.header is None:
                return None
            e.begin(Busy.SPILLING)
            return SpillJob(e.kid, e.serial, e.key, e.tenant, e.nbytes, e.header, not e.verified,
                            self.pool_slot(e.offset, e.nbytes))

    def spill_rehashed(self, job: SpillJob, got: int) -> bool:
        """A chunk committed unverified hashed to ``got`` in its slot: True if that is its checksum; else it
        is no longer busy, counted as a checksum failure and (if still indexed and unpinned) dropped."""
        st = self.st
        with st.lock:
            e = st.ix.live(job.kid, job.serial)
            if got == job.header.checksum:
                if e is not None:
                    e.mark_verified()
                return True
            st.counters["checksum_failures"] += 1
            if e is not None:
                e.end(Busy.SPILLING)
                if e.pins == 0:
                    self.alloc.drop(e)
            return False

    def spill_failed(self, job: SpillJob, exc: BaseException) -> None:
        """A write to SSD failed: counted, and kept for stats as the last spill error."""
        with self.st.lock:
            self.st.counters["spill_errors"] += 1
            self.last_spill_error = f"{type(exc).__name__}: {exc}"

    def spill_written(self, job: SpillJob, loc: Loc | None, evicted: list[str]) -> None:
        """The spiller is done with ``job``'s chunk: it reached the SSD at ``loc`` (None: it did not), and the SSD
        reclaimed the records of the chunks ``evicted`` to make room (one whose record is already in ``loc``'s
        segment keeps it).  A chunk dropped meanwhile has its new record dropped too."""
        st = self.st
        with st.lock:
            e = st.ix.live(job.kid, job.serial)
            if e is not None:
                e.end(Busy.SPILLING)
            for k in evicted:
                v = st.ix.get(k)
                if v is not None and v.loc is not None and (loc is None or v.loc.seg != loc.seg):
                    st.counters["evictions_ssd"] += 1
                    if v.in_memory:
                        st.ix.ssd_lost(v)
                    else:  # its only copy (a promotion under way finds it gone)
                        st.ix.remove(v)
            if loc is None:
                return
            if e is not None:
                st.ix.ssd_gained(e, loc)
            elif st.ssd is not None:
                st.ssd.drop(job.key, loc)

    def promotion_finished(self, job: PromoteJob, ok: bool) -> str | None:
        """The promoter read ``job``'s chunk back into its slot, checksum ``ok`` or not.  Ends the promotion;
        the chunk is in memory if it is still indexed and ``ok``, else the slot is freed and a bad record
        (still indexed) dropped: returns the error for its waiters then, else None."""
        st = self.st
        with st.lock:
            e = st.ix.live(job.kid, job.serial)
            if e is not None:
                e.end(Busy.PROMOTING)
            if ok and e is not None:
                st.ix.memory_gained(e, job.offset)
                st.counters["ssd_promotions"] += 1
                return None
            st.arena.free(job.offset, job.nbytes)
            if e is None:  # a record recycled meanwhile is simply gone
                return None
            if e.loc is not None and st.ssd is not None:
                st.ssd.drop(e.key, e.loc)
            st.ix.remove(e)
            st.counters["checksum_failures"] += 1
            return f"chunk {job.kid} failed its checksum on SSD and was dropped; recompute it"
