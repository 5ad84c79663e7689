"""Allocation and eviction: pool slots for chunks, made by evicting unpinned LRU chunks, and freeing what a
dropped chunk holds.

Owns: `Allocation` (slot allocation with LRU eviction, clean chunks (already on SSD) first, then dirty ones
(lost, counted); a chunk's drop).  Must not touch: admission rules and quotas (admission.py), commits,
pins, the SSD's format.  Every method runs with the store's lock held.
"""

from __future__ import annotations

from kvrelay.store.lifecycle import Entry
from kvrelay.store.shared import CoreState

EVICT_BATCH = 8  # LRU victims taken per scan when making room


class Allocation:
    def __init__(self, st: CoreState) -> None:
        self.st = st

    def passes(self) -> tuple[bool, ...]:
        """Eviction passes (dirty chunks allowed or not): without an SSD tier every chunk is dirty."""
        return (True,) if self.st.ssd is None else (False, True)

    def alloc(self, nbytes: int) -> int | None:
        """A slot of ``nbytes``, evicting unpinned LRU chunks if need be; None if there is no room even then."""
        arena = self.st.arena
        off = arena.alloc(nbytes)
        if off is not None:
            return off
        ix = self.st.ix
        # Oldest first: chunks already on SSD, then (losing them) chunks only in memory.  Victims are taken
        # from the LRU's old end a few at a time, so making room costs about what it frees, not a walk over
        # every stored chunk (was: a copy and a scan of the whole LRU per allocation, 64 us per 4 MiB chunk
        # with a full 1 GiB pool, and O(chunks) with many small ones).
        for dirty_ok in self.passes():
            while True:
                victims = []
                for kid in ix.lru:
                    e = ix.entries[kid]
                    if not e.evictable(dirty_ok):
                        continue
                    victims.append(e)
                    if len(victims) == EVICT_BATCH:
                        break
                if not victims:
                    break
                for e in victims:
                    self.evict_memory(e)
                    off = arena.alloc(nbytes)
                    if off is not None:
                        return off
        return None

    def evict_memory(self, e: Entry) -> None:
        """Drop the pool copy of an in-memory chunk: a clean one stays on SSD, a dirty one is lost."""
        st = self.st
        st.arena.free(e.offset, e.nbytes)
        st.counters["evictions_memory"] += 1
        if e.on_ssd:
            st.ix.memory_lost(e)
        else:
            st.counters["evictions_dropped"] += 1
            st.ix.remove(e)

    def pinned_in_memory(self) -> list[Entry]:
        ix = self.st.ix
        kids = {p.kid for p in ix.pins.values()}
        return [e for k in kids if (e := ix.entries.get(k)) is not None and e.in_pool]

    def drop(self, e: Entry, scrub: bool = False) -> None:
        """Forget a chunk and free what it holds: its pool slot and its SSD record (with ``scrub``, the
        record's payload is overwritten too)."""
        st = self.st
        if e.in_pool:
            st.arena.free(e.offset, e.nbytes)
        if e.loc is not None and st.ssd is not None:
            st.ssd.drop(e.key, e.loc, scrub=scrub)
        st.ix.remove(e)
