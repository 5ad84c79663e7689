"""Admission and quotas: a reservation's slots, all or nothing, within the pool and the tenant's quota.

Owns: `Admission.reserve` (checks a request's sizes and TTL, shares reservations and ready chunks, refuses
with "full" when pinned and reserved bytes leave no room) and the tenant quota rule: a tenant over its
quota has its own unpinned LRU chunks evicted to make room, never another tenant's, else is refused
(code "quota").  Must not touch: how room is made in the pool (allocation.py), commits, pins.
"""

from __future__ import annotations

from typing import Sequence

from kvrelay.keys import ChunkKey, kid_of
from kvrelay.store.allocation import Allocation
from kvrelay.store.errors import OpError, StoreCode
from kvrelay.store.lifecycle import Entry
from kvrelay.store.lifecycle import Tier
from kvrelay.store.pool import align_up
from kvrelay.store.protocol import Slot
from kvrelay.store.shared import CoreState


class Admission:
    def __init__(self, st: CoreState, alloc: Allocation) -> None:
        self.st = st
        self.alloc = alloc

    def reserve(self, request_id: str, keys: list[ChunkKey], sizes: list[int], ttl: float,
                namespace: str, tenant: str = "", tokens: Sequence[int] = ()) -> list[Slot]:
        st = self.st
        if len(keys) != len(sizes):
            raise OpError(StoreCode.BAD_REQUEST, f"reserve: {len(keys)} keys but {len(sizes)} sizes")
        if not 0 < ttl <= 86400:
            raise OpError(StoreCode.BAD_REQUEST, f"reserve ttl {ttl} must be in (0, 86400] seconds")
        for k, n in zip(keys, sizes, strict=True):
            if not 0 < n <= st.cfg.max_chunk_bytes:
                raise OpError(StoreCode.BAD_REQUEST,
                              f"chunk {kid_of(k)} of {n} bytes: chunks must be 1..max_chunk_bytes "
                              f"({st.cfg.max_chunk_bytes}); split it or raise max_chunk_bytes")
        now = st.clock.monotonic()
        ix, arena = st.ix, st.arena
        with st.lock:
            slots: list[Slot | None] = [None] * len(keys)
            todo = []
            for i, (k, n) in enumerate(zip(keys, sizes, strict=True)):
                e = ix.get(kid_of(k))
                if e is None:
                    todo.append(i)
                elif e.ready:
                    ix.touch(e, now)
                    slots[i] = Slot(-1, e.nbytes, present=True)
                elif e.nbytes != n:
                    raise OpError(StoreCode.BAD_REQUEST,
                                  f"chunk {e.kid} is already reserved with {e.nbytes} bytes, not {n}")
                else:  # reserved by someone else: share the reservation
                    slots[i] = Slot(e.offset, e.nbytes)
            self.quota_room(tenant, sum({kid_of(keys[i]): sizes[i] for i in todo}.values()), request_id)
            need = sum(align_up(sizes[i]) for i in dict.fromkeys(todo))
            pinned = sum(align_up(e.nbytes) for e in self.alloc.pinned_in_memory())
            if need > arena.capacity - ix.reserved_bytes - pinned:
                st.counters["admission_refusals"] += 1
                raise OpError(StoreCode.FULL,
                              f"store pool full: request {request_id!r} needs {need} bytes, the pool has "
                              f"{arena.capacity} of which {ix.reserved_bytes} are reserved and {pinned} pinned; "
                              f"raise pool_size, release leases or retry later")
            done: list[tuple[int, int]] = []
            for i in todo:
                k = keys[i]
                kid = kid_of(k)
                if kid in ix.entries:  # duplicate key within this request
                    e = ix.entries[kid]
                    slots[i] = Slot(e.offset, e.nbytes)
                    continue
                off = self.alloc.alloc(sizes[i])
                if off is None:
                    for j, o in done:
                        arena.free(o, sizes[j])
                        ix.remove(ix.entries[kid_of(keys[j])])
                    st.counters["admission_refusals"] += 1
                    raise OpError(StoreCode.FULL,
                                  f"store pool full: no contiguous {sizes[i]}-byte range for request "
                                  f"{request_id!r} after evicting every unpinned chunk; raise pool_size")
                done.append((i, off))
                ix.add_reserved(Entry(k, kid, sizes[i], Tier.RESERVED, off, None, None, request_id, namespace,
                                      now + ttl, now, tenant))  # (Entry.reserved, without its keywords' cost)
                slots[i] = Slot(off, sizes[i])
            if ix.events is not None:  # the prompt's tokens describe its chunks in KV events
                ix.events.reserved(keys, tokens, namespace, tenant)
            return slots  # type: ignore[return-value]  # no None left: each index is present, shared or reserved

    def quota_room(self, tenant: str, need: int, request_id: str) -> None:
        """Make ``need`` more bytes fit the tenant's quota (lock held) by evicting the tenant's own unpinned LRU
        chunks, clean (on SSD) before dirty (lost); else refuse with code "quota"."""
        st = self.st
        quota = st.policy.quota(tenant)
        book = st.ix.book
        u = book.usage.get(tenant)
        held = u.pool_bytes if u is not None else 0
        if not quota or held + need <= quota:
            return
        if u is not None and need <= quota:
            for dirty_ok in self.alloc.passes():
                for kid in list(u.lru):
                    e = st.ix.entries[kid]
                    if not e.evictable(dirty_ok):
                        continue
                    self.alloc.evict_memory(e)
                    book.count(tenant, "quota_evictions")
                    if u.pool_bytes + need <= quota:
                        return
        book.count(tenant, "quota_refusals")
        st.counters["admission_refusals"] += 1
        left = u.pool_bytes if u is not None else 0
        raise OpError(StoreCode.QUOTA,
                      f"tenant {tenant!r} is over its quota: request {request_id!r} needs {need} bytes, the tenant "
                      f"holds {held} of its {quota} ({left} after evicting its own unpinned chunks; the rest is "
                      f"pinned or reserved); raise its share in --tenant-quotas, release its leases or retry later")
