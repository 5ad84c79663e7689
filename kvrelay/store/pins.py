"""Pins and reads: lookups, pulls that pin a ready in-memory chunk (an SSD-only one is promoted first),
same-host directory pulls, client leases and unpins.  (Not the page-locking of the pool for GPUs: that is
pinning.py.)

Owns: `Pins` (what a read does to the LRU, the pins and the read counters).  Must not touch: admission,
commits, the promoter's work (it asks tiering.py to promote).
"""

from __future__ import annotations

from kvrelay.keys import ChunkKey, kid_of
from kvrelay.store.errors import OpError, StoreCode
from kvrelay.store.lifecycle import Entry
from kvrelay.store.pool import align_up
from kvrelay.store.protocol import Slot
from kvrelay.store.shared import CoreState
from kvrelay.store.tiering import Tiering
from kvrelay.transfer.wire import ChunkHeader


class Pins:
    def __init__(self, st: CoreState, tiering: Tiering) -> None:
        self.st = st
        self.tiering = tiering

    def lookup(self, keys: list[ChunkKey], record: bool = True, tenant: str = "") -> int:
        """How many of ``keys``, from the first, are ready (in memory or on SSD)."""
        st = self.st
        with st.lock:
            n = 0
            for k in keys:
                e = st.ix.get(kid_of(k))
                if e is None or not e.ready:
                    break
                n += 1
            if not record:
                return n
            c = st.counters
            c["lookups"] += 1
            c["lookup_hits"] += n > 0
            c["lookup_chunks"] += len(keys)
            c["lookup_chunks_hit"] += n
            st.ix.book.count(tenant, "lookup_chunks", len(keys))
            st.ix.book.count(tenant, "lookup_chunks_hit", n)
            return n

    def acquire(self, key: ChunkKey) -> tuple[Slot, ChunkHeader] | None:
        """If the chunk is ready and in memory, pin it and return its slot; else None (an SSD-only chunk is
        read back in the background first: the server wakes the waiter when it lands)."""
        st = self.st
        kid = kid_of(key)
        now = st.clock.monotonic()
        with st.lock:
            e = st.ix.get(kid)
            if e is None or not e.ready or e.header is None:  # (READY entries have a header)
                return None
            if not e.in_memory:
                self.tiering.promote(e)
                return None
            st.ix.touch(e, now)
            pid = st.ix.add_pin(e, now + st.cfg.pull_pin_ttl, lease=False)
            st.counters["pulls"] += 1
            st.ix.book.count(e.tenant, "pulled_bytes", e.nbytes)
            return Slot(e.offset, e.nbytes, pin=pid), e.header

    def acquire_many(self, keys: list[ChunkKey], max_bytes: int = 0) -> tuple[list[Slot], list[ChunkHeader]] | int:
        """All or nothing: if every chunk is ready and in memory, pin each and return slots and headers; else
        the index of the first key that is not (nothing pinned; SSD-only ones start coming back).
        ``max_bytes`` > 0 refuses a batch larger than that (it could not all be pinned in the pool at once)."""
        st = self.st
        ix = st.ix
        now = st.clock.monotonic()
        with st.lock:
            entries: list[Entry] = []
            headers: list[ChunkHeader] = []
            for i, k in enumerate(keys):
                e = ix.get(kid_of(k))
                if e is None or not e.ready or e.header is None:  # (READY entries have a header)
                    return i
                entries.append(e)
                headers.append(e.header)
            if max_bytes and sum(align_up(e.nbytes) for e in {e.kid: e for e in entries}.values()) > max_bytes:
                raise OpError(StoreCode.BAD_REQUEST, f"pull_many of {len(keys)} chunks needs more than the pool's "
                                                     f"{max_bytes} bytes pinned at once; pull fewer keys per call")
            away = [i for i, e in enumerate(entries) if not e.in_memory]
            for e in entries:  # most recently used: the room made for the SSD-only ones is not taken from these
                if e.in_memory:
                    ix.touch(e, now)
            for i in away:
                self.tiering.promote(entries[i])
            if away:
                return away[0]
            slots = []
            for e in entries:
                ix.touch(e, now)
                pid = ix.add_pin(e, now + st.cfg.pull_pin_ttl, lease=False)
                slots.append(Slot(e.offset, e.nbytes, pin=pid))
                ix.book.count(e.tenant, "pulled_bytes", e.nbytes)
            st.counters["pulls"] += len(keys)
            return slots, headers

    def touched(self, kids: list[str]) -> None:
        """Chunks a same-host client pulled through the directory (no round trip): up the LRU, and counted."""
        st = self.st
        now = st.clock.monotonic()
        n = 0
        with st.lock:
            for kid in kids:
                e = st.ix.get(kid)
                if e is not None and e.ready:
                    st.ix.touch(e, now)
                    st.ix.book.count(e.tenant, "pulled_bytes", e.nbytes)
                    n += 1
            st.counters["pulls"] += n
            st.counters["local_pulls"] += n

    def lease(self, keys: list[ChunkKey], ttl: float) -> list[int]:
        """Pin each chunk for ``ttl`` seconds (a client lease); all must exist."""
        if not 0 < ttl <= 86400:
            raise OpError(StoreCode.BAD_REQUEST, f"lease ttl {ttl} must be in (0, 86400] seconds")
        st = self.st
        now = st.clock.monotonic()
        with st.lock:
            out = []
            for k in keys:
                e = st.ix.get(kid_of(k))
                if e is None:
                    raise OpError(StoreCode.NOT_FOUND, f"lease of {kid_of(k)}: unknown chunk")
                out.append(st.ix.add_pin(e, now + ttl, lease=True))
            return out

    def unpin(self, pids: list[int]) -> None:
        with self.st.lock:
            for p in pids:
                self.st.ix.drop_pin(p)
