"""The store's logic: admission, commit, lookup, pull, eviction (leases, purge and expiry: upkeep.py).

Owns: the rules that move chunks between states and tiers (under one lock), and the narrow interface the
background threads change the store through (the spiller: ``spill_*``, the promoter: ``promotion_finished``;
they never take the lock or see the index).  Must not touch: sockets (server.py), the on-disk format
(ssd.py) or the allocator internals (pool.py).

Tenants (tenants.py): a reservation names its tenant (the request's cache_salt); a tenant over its quota
has its own unpinned LRU chunks evicted to make room, never another tenant's, else is refused (code
"quota").  Its hits, moved bytes and usage are counted per tenant.

Eviction: ``reserve`` makes room by dropping the in-memory copy of unpinned LRU chunks, clean ones (already
on SSD) first, then dirty ones (lost, counted); if pinned and reserved bytes leave no room it refuses
with `OpError("full")`.  Every committed chunk is queued for write-behind to SSD on a background thread:
publishers never wait for the disk.
"""

from __future__ import annotations

import platform
import queue
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Sequence

from kvrelay.keys import ChunkKey, kid_of
from kvrelay.store.audit import AuditLog
from kvrelay.store.config import StoreConfig, parse_size
from kvrelay.store.crypto import KeyRing
from kvrelay.store.directory import Directory, slots_for
from kvrelay.store.index import Entry, Index, OpError, State
from kvrelay.store.pool import Arena, SharedPool, align_up
from kvrelay.store.protocol import Slot
from kvrelay.store.promote import Promoter
from kvrelay.store.spill import Spill, spill_loop
from kvrelay.store.ssd import Loc, SsdTier
from kvrelay.store.tenants import TenantPolicy, parse_per_tenant
from kvrelay.store.upkeep import Upkeep
from kvrelay.transfer.wire import ChunkHeader, checksum

if TYPE_CHECKING:
    from kvrelay.events.publisher import EventPublisher


COUNTERS = ("lookups", "lookup_hits", "lookup_chunks", "lookup_chunks_hit", "commits", "pulls", "admission_refusals",
            "evictions_memory", "evictions_dropped", "evictions_ssd", "checksum_failures", "ssd_promotions",
            "lease_expiries", "pull_pin_expiries", "reservation_expiries", "ttl_expiries", "purged", "spill_errors",
            "bad_requests", "aborts", "local_pulls")


EVICT_BATCH = 8  # LRU victims taken per scan when making room


class StoreCore(Upkeep):
    audit: AuditLog | None = None

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        self.pool = SharedPool(cfg.pool_name, cfg.pool_size, create=True)
        self.ix = Index()
        self.lock = threading.RLock()
        self.ssd: SsdTier | None = None
        self._spiller: threading.Thread | None = None
        self.promoter: Promoter | None = None
        try:
            self._start(cfg)
        except BaseException:  # no pool or directory left behind in /dev/shm by a daemon that did not start
            self.close()
            raise

    def _start(self, cfg: StoreConfig) -> None:
        self.arena = Arena(cfg.pool_size)
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        # (kid, committed at, bytes) for the spiller; it writes when the control plane is quiet (spill.py)
        self._spill_q: "queue.SimpleQueue[tuple[str, float, int] | None]" = queue.SimpleQueue()
        self.spill_backlog = 0  # bytes committed and not yet taken by the spiller
        self.last_activity = 0.0  # monotonic time of the last request the server handled
        self.closing = False
        self.recovered = self.recover_dropped = 0
        self.last_spill_error = ""
        quotas, default_quota = parse_per_tenant(cfg.tenant_quotas, "tenant_quotas", lambda v: parse_size(v, "size"))
        ttls, default_ttl = parse_per_tenant(cfg.tenant_ttls, "tenant_ttls", float)
        self.policy = TenantPolicy(quotas, default_quota, ttls, default_ttl)
        self.ix.book.max_labels = cfg.max_tenant_labels
        self.keyring = KeyRing.load(cfg.at_rest_key) if cfg.at_rest_key else None
        self.audit = AuditLog(cfg.audit_log) if cfg.audit_log else None
        if cfg.directory and platform.machine() in ("x86_64", "AMD64"):
            self.ix.directory = Directory(cfg.pool_name, slots_for(cfg.pool_size), self.pool.ident)
        self.events_publisher: EventPublisher | None = None
        if cfg.events:  # before SSD recovery: the chunks recovered whole are announced again (kvrelay.events)
            from kvrelay.events.store import StoreEvents
            self.ix.events = StoreEvents(cfg.events_block_size, cfg.ssd_dir)
        if cfg.ssd_dir:
            self.ssd = SsdTier(cfg.ssd_dir, cfg.ssd_size, cfg.ssd_segment_size, cfg.ssd_direct, cfg.ssd_fsync,
                               self.keyring)
            now = time.monotonic()
            recs, self.recover_dropped = self.ssd.recover()
            for r in recs:
                e = Entry(r.key, kid_of(r.key), r.header.nbytes, State.READY, header=r.header,
                          namespace=r.header.compat_hash, last_access=now, ssd=r.loc, tenant=r.tenant)
                self.ix.add_recovered(e)
            self.recovered = len(recs)
            self._spiller = threading.Thread(target=spill_loop, args=(self, self.ssd, self._spill_q),
                                             name="kvrelay-spill", daemon=True)
            self._spiller.start()
            self.promoter = Promoter(self, self.ssd)
        if self.ix.events is not None:
            from kvrelay.events.store import start_publisher
            self.events_publisher = start_publisher(self.ix.events, cfg, self.lock)

    # --- queries -----------------------------------------------------------------------------------
    def lookup(self, keys: list[ChunkKey], record: bool = True, tenant: str = "") -> int:
        with self.lock:
            n = 0
            for k in keys:
                e = self.ix.get(kid_of(k))
                if e is None or e.state is not State.READY:
                    break
                n += 1
            if not record:
                return n
            self.counters["lookups"] += 1
            self.counters["lookup_hits"] += n > 0
            self.counters["lookup_chunks"] += len(keys)
            self.counters["lookup_chunks_hit"] += n
            self.ix.book.count(tenant, "lookup_chunks", len(keys))
            self.ix.book.count(tenant, "lookup_chunks_hit", n)
            return n

    # --- admission and publish ---------------------------------------------------------------------
    def reserve(self, request_id: str, keys: list[ChunkKey], sizes: list[int], ttl: float,
                namespace: str, tenant: str = "", tokens: Sequence[int] = ()) -> list[Slot]:
        if len(keys) != len(sizes):
            raise OpError("bad_request", f"reserve: {len(keys)} keys but {len(sizes)} sizes")
        if not 0 < ttl <= 86400:
            raise OpError("bad_request", f"reserve ttl {ttl} must be in (0, 86400] seconds")
        for k, n in zip(keys, sizes, strict=True):
            if not 0 < n <= self.cfg.max_chunk_bytes:
                raise OpError("bad_request", f"chunk {kid_of(k)} of {n} bytes: chunks must be 1..max_chunk_bytes "
                                             f"({self.cfg.max_chunk_bytes}); split it or raise max_chunk_bytes")
        now = time.monotonic()
        with self.lock:
            slots: list[Slot | None] = [None] * len(keys)
            todo = []
            for i, (k, n) in enumerate(zip(keys, sizes, strict=True)):
                e = self.ix.get(kid_of(k))
                if e is None:
                    todo.append(i)
                elif e.state is State.READY:
                    self.ix.touch(e, now)
                    slots[i] = Slot(-1, e.nbytes, present=True)
                elif e.nbytes != n:
                    raise OpError("bad_request", f"chunk {e.kid} is already reserved with {e.nbytes} bytes, not {n}")
                else:  # reserved by someone else: share the reservation
                    slots[i] = Slot(e.offset, e.nbytes)
            self._quota_room(tenant, sum({kid_of(keys[i]): sizes[i] for i in todo}.values()), request_id)
            need = sum(align_up(sizes[i]) for i in dict.fromkeys(todo))
            pinned = sum(align_up(e.nbytes) for e in self._pinned_in_memory())
            if need > self.arena.capacity - self.arena_reserved() - pinned:
                self.counters["admission_refusals"] += 1
                raise OpError("full", f"store pool full: request {request_id!r} needs {need} bytes, the pool has "
                                      f"{self.arena.capacity} of which {self.arena_reserved()} are reserved and "
                                      f"{pinned} pinned; raise pool_size, release leases or retry later")
            done: list[tuple[int, int]] = []
            for i in todo:
                k = keys[i]
                kid = kid_of(k)
                if kid in self.ix.entries:  # duplicate key within this request
                    e = self.ix.entries[kid]
                    slots[i] = Slot(e.offset, e.nbytes)
                    continue
                off = self._alloc(sizes[i])
                if off is None:
                    for j, o in done:
                        self.arena.free(o, sizes[j])
                        self.ix.remove(self.ix.entries[kid_of(keys[j])])
                    self.counters["admission_refusals"] += 1
                    raise OpError("full", f"store pool full: no contiguous {sizes[i]}-byte range for request "
                                          f"{request_id!r} after evicting every unpinned chunk; raise pool_size")
                done.append((i, off))
                self.ix.add_reserved(Entry(k, kid, sizes[i], State.RESERVED, offset=off, request_id=request_id,
                                           namespace=namespace, deadline=now + ttl, last_access=now, tenant=tenant))
                slots[i] = Slot(off, sizes[i])
            if self.ix.events is not None:  # the prompt's tokens describe its chunks in KV events
                self.ix.events.reserved(keys, tokens, namespace, tenant)
            return slots  # type: ignore[return-value]  # no None left: each index is present, shared or reserved

    def _quota_room(self, tenant: str, need: int, request_id: str) -> None:
        """Make ``need`` more bytes fit the tenant's quota (lock held) by evicting the tenant's own unpinned LRU
        chunks, clean (on SSD) before dirty (lost); else refuse with code "quota"."""
        quota = self.policy.quota(tenant)
        book = self.ix.book
        u = book.usage.get(tenant)
        held = u.pool_bytes if u is not None else 0
        if not quota or held + need <= quota:
            return
        if u is not None and need <= quota:
            for dirty_ok in ((True,) if self.ssd is None else (False, True)):
                for kid in list(u.lru):
                    e = self.ix.entries[kid]
                    if e.pins or e.spilling or (e.ssd is None and not dirty_ok):
                        continue
                    self._evict_memory(e)
                    book.count(tenant, "quota_evictions")
                    if u.pool_bytes + need <= quota:
                        return
        book.count(tenant, "quota_refusals")
        self.counters["admission_refusals"] += 1
        left = u.pool_bytes if u is not None else 0
        raise OpError("quota", f"tenant {tenant!r} is over its quota: request {request_id!r} needs {need} bytes, "
                               f"the tenant holds {held} of its {quota} ({left} after evicting its own unpinned "
                               f"chunks; the rest is pinned or reserved); raise its share in --tenant-quotas, "
                               f"release its leases or retry later")

    def arena_reserved(self) -> int:
        return self.ix.reserved_bytes

    def _pinned_in_memory(self) -> list[Entry]:
        kids = {p.kid for p in self.ix.pins.values()}
        return [e for k in kids if (e := self.ix.entries.get(k)) is not None and e.offset >= 0]

    def _alloc(self, nbytes: int) -> int | None:
        off = self.arena.alloc(nbytes)
        if off is not None:
            return off
        # Oldest first: chunks already on SSD, then (losing them) chunks only in memory.  Victims are taken
        # from the LRU's old end a few at a time, so making room costs about what it frees, not a walk over
        # every stored chunk (was: a copy and a scan of the whole LRU per allocation, 64 us per 4 MiB chunk
        # with a full 1 GiB pool, and O(chunks) with many small ones).
        for dirty_ok in ((True,) if self.ssd is None else (False, True)):
            while True:
                victims = []
                for kid in self.ix.lru:
                    e = self.ix.entries[kid]
                    if e.pins or e.spilling or (e.ssd is None and not dirty_ok):
                        continue
                    victims.append(e)
                    if len(victims) == EVICT_BATCH:
                        break
                if not victims:
                    break
                for e in victims:
                    self._evict_memory(e)
                    off = self.arena.alloc(nbytes)
                    if off is not None:
                        return off
        return None

    def _evict_memory(self, e: Entry) -> None:
        self.arena.free(e.offset, e.nbytes)
        self.ix.set_memory(e, -1)
        self.counters["evictions_memory"] += 1
        if e.ssd is None:
            self.counters["evictions_dropped"] += 1
            self.ix.remove(e)

    def commit(self, key: ChunkKey, header: ChunkHeader, namespace: str, verify: bool = True) -> bool:
        """Check (and with ``verify``, re-hash the slot: outside the lock) and mark ready; returns False if the
        chunk was already present (nothing to do)."""
        kid = kid_of(key)
        with self.lock:
            e = self._committable(kid, header, namespace)
            if e is None:
                return False
            e.verified = False
            if verify:
                e.spilling = True  # neither evicted nor purged while hashed without the lock
        if verify:
            try:
                got = checksum(self.pool.view[e.offset:e.offset + e.nbytes])
            finally:
                with self.lock:
                    e.spilling = False
            if got != header.checksum:
                with self.lock:
                    self.counters["checksum_failures"] += 1
                raise OpError("corrupt", f"commit of {kid}: checksum mismatch (header {header.checksum:#018x}, "
                                         f"pool slot {got:#018x}); the slot was not fully written")
            e.verified = True
        with self.lock:
            if e.state is State.READY:  # a concurrent commit of the same content won
                return False
            self.ix.mark_ready(e, header, time.monotonic())
            self.counters["commits"] += 1
            self.ix.book.count(e.tenant, "committed_bytes", e.nbytes)
        if self.ssd is not None:
            self._queue_spill([e])
        return True

    def _queue_spill(self, entries: list[Entry]) -> None:
        now = time.monotonic()
        with self.lock:
            self.spill_backlog += sum(e.nbytes for e in entries)
        for e in entries:
            self._spill_q.put((e.kid, now, e.nbytes))

    def commit_many(self, keys: list[ChunkKey], headers: list[ChunkHeader], namespace: str,
                    verify: bool) -> tuple[list[str], list[OpError]]:
        """`commit` for each chunk, each on its own; returns (kids committed fresh, refusals).  Without
        ``verify`` (nothing to hash) under one lock acquisition.  ``keys`` and ``headers`` pair up (the server
        refuses a request where their lengths differ)."""
        refused: list[OpError] = []
        if verify:
            kids: list[str] = []
            for key, header in zip(keys, headers, strict=True):
                try:
                    if self.commit(key, header, namespace, verify=True):
                        kids.append(kid_of(key))
                except OpError as exc:
                    refused.append(exc)
            return kids, refused
        fresh: list[Entry] = []
        now = time.monotonic()
        with self.lock:
            for key, header in zip(keys, headers, strict=True):
                kid = kid_of(key)
                try:
                    e = self._committable(kid, header, namespace)
                except OpError as exc:
                    refused.append(exc)
                    continue
                if e is None:
                    continue
                e.verified = False
                self.ix.mark_ready(e, header, now)
                self.ix.book.count(e.tenant, "committed_bytes", e.nbytes)
                fresh.append(e)
            self.counters["commits"] += len(fresh)
        if self.ssd is not None:
            self._queue_spill(fresh)
        return [e.kid for e in fresh], refused

    def _committable(self, kid: str, header: ChunkHeader, namespace: str) -> Entry | None:
        e = self.ix.get(kid)
        if e is None:
            raise OpError("not_found", f"commit of {kid}: no reservation (it expired or was released); "
                                       f"reserve before publishing")
        if e.state is State.READY:
            return None
        if namespace and header.compat_hash != namespace:
            raise OpError("bad_request", f"commit of {kid}: header compat hash {header.compat_hash} differs from "
                                         f"this client's {namespace}")
        if header.nbytes != e.nbytes:
            raise OpError("bad_request", f"commit of {kid}: header says {header.nbytes} bytes, reserved "
                                         f"{e.nbytes}")
        return e

    # --- pull --------------------------------------------------------------------------------------
    def acquire(self, key: ChunkKey) -> tuple[Slot, ChunkHeader] | None:
        """If the chunk is ready and in memory, pin it and return its slot; else None (an SSD-only chunk is
        read back in the background first: the server wakes the waiter when it lands)."""
        kid = kid_of(key)
        now = time.monotonic()
        with self.lock:
            e = self.ix.get(kid)
            if e is None or e.state is not State.READY or e.header is None:  # (READY entries have a header)
                return None
            if e.offset < 0:
                self._promote(e)
                return None
            self.ix.touch(e, now)
            pid = self.ix.add_pin(e, now + self.cfg.pull_pin_ttl, lease=False)
            self.counters["pulls"] += 1
            self.ix.book.count(e.tenant, "pulled_bytes", e.nbytes)
            return Slot(e.offset, e.nbytes, pin=pid), e.header

    def acquire_many(self, keys: list[ChunkKey], max_bytes: int = 0) -> tuple[list[Slot], list[ChunkHeader]] | int:
        """All or nothing: if every chunk is ready and in memory, pin each and return slots and headers; else
        the index of the first key that is not (nothing pinned; SSD-only ones start coming back).
        ``max_bytes`` > 0 refuses a batch larger than that (it could not all be pinned in the pool at once)."""
        now = time.monotonic()
        with self.lock:
            entries: list[Entry] = []
            headers: list[ChunkHeader] = []
            for i, k in enumerate(keys):
                e = self.ix.get(kid_of(k))
                if e is None or e.state is not State.READY or e.header is None:  # (READY entries have a header)
                    return i
                entries.append(e)
                headers.append(e.header)
            if max_bytes and sum(align_up(e.nbytes) for e in {e.kid: e for e in entries}.values()) > max_bytes:
                raise OpError("bad_request", f"pull_many of {len(keys)} chunks needs more than the pool's "
                                             f"{max_bytes} bytes pinned at once; pull fewer keys per call")
            away = [i for i, e in enumerate(entries) if e.offset < 0]
            for e in entries:  # most recently used: the room made for the SSD-only ones is not taken from these
                if e.offset >= 0:
                    self.ix.touch(e, now)
            for i in away:
                self._promote(entries[i])
            if away:
                return away[0]
            slots = []
            for e in entries:
                self.ix.touch(e, now)
                pid = self.ix.add_pin(e, now + self.cfg.pull_pin_ttl, lease=False)
                slots.append(Slot(e.offset, e.nbytes, pin=pid))
                self.ix.book.count(e.tenant, "pulled_bytes", e.nbytes)
            self.counters["pulls"] += len(keys)
            return slots, headers

    def touched(self, kids: list[str]) -> None:
        """Chunks a same-host client pulled through the directory (no round trip): up the LRU, and counted."""
        now = time.monotonic()
        n = 0
        with self.lock:
            for kid in kids:
                e = self.ix.get(kid)
                if e is not None and e.state is State.READY:
                    self.ix.touch(e, now)
                    self.ix.book.count(e.tenant, "pulled_bytes", e.nbytes)
                    n += 1
            self.counters["pulls"] += n
            self.counters["local_pulls"] += n

    def _promote(self, e: Entry) -> None:
        """Start reading an SSD-only chunk back (lock held); nothing to do if it is already on its way."""
        if e.promoting >= 0:
            return
        assert self.promoter is not None and e.ssd is not None
        off = self._alloc(e.nbytes)
        if off is None:
            raise OpError("full", f"cannot bring {e.kid} back from SSD: the pool has no room (all pinned or reserved)")
        self.promoter.start(e, off)

    # --- for the spiller (spill.py) and the promoter (promote.py): each call is one lock acquisition ------
    @property
    def capacity(self) -> int:
        """The pool's size in bytes."""
        return self.arena.capacity

    def pool_slot(self, offset: int, nbytes: int) -> memoryview:
        """A view of the pool slot of an ``nbytes`` chunk at ``offset`` (its aligned length)."""
        return self.pool.view[offset:offset + align_up(nbytes)]

    def spill_take(self, kid: str, nbytes: int) -> Spill | None:
        """The spiller takes a queued chunk (``nbytes`` leave the backlog): if it still needs writing (ready,
        in memory, not on SSD), mark it ``spilling`` and return it with its slot's view; else None."""
        with self.lock:
            self.spill_backlog -= nbytes
            e = self.ix.get(kid)
            if e is None or e.offset < 0 or e.ssd is not None or e.state is not State.READY or e.header is None:
                return None
            e.spilling = True
            return Spill(e, e.header, self.pool_slot(e.offset, e.nbytes))

    def spill_rehashed(self, e: Entry, got: int) -> bool:
        """A chunk committed unverified hashed to ``got`` in its slot: True if that is its checksum; else it
        is no longer ``spilling``, counted as a checksum failure and (if still indexed and unpinned) dropped."""
        with self.lock:
            if e.header is not None and got == e.header.checksum:
                e.verified = True
                return True
            e.spilling = False
            self.counters["checksum_failures"] += 1
            if self.ix.get(e.kid) is e and e.pins == 0:
                self._drop(e)
            return False

    def spill_failed(self, exc: BaseException) -> None:
        """A write to SSD failed: counted, and kept for stats as the last spill error."""
        with self.lock:
            self.counters["spill_errors"] += 1
            self.last_spill_error = f"{type(exc).__name__}: {exc}"

    def spill_written(self, e: Entry, loc: Loc | None, evicted: list[str]) -> None:
        """The spiller is done with ``e``: it reached the SSD at ``loc`` (None: it did not), and the SSD
        reclaimed the records of the chunks ``evicted`` to make room (one whose record is already in ``loc``'s
        segment keeps it).  A chunk dropped meanwhile has its new record dropped too."""
        with self.lock:
            e.spilling = False
            for k in evicted:
                v = self.ix.get(k)
                if v is not None and v.ssd is not None and (loc is None or v.ssd.seg != loc.seg):
                    self.ix.set_ssd(v, None)
                    self.counters["evictions_ssd"] += 1
                    if v.offset < 0:
                        self.ix.remove(v)
            if loc is None:
                return
            if self.ix.get(e.kid) is e:
                self.ix.set_ssd(e, loc)
            elif self.ssd is not None:
                self.ssd.drop(e.key, loc)

    def promotion_finished(self, e: Entry, offset: int, ok: bool) -> str | None:
        """The promoter read ``e`` back into the slot at ``offset``, checksum ``ok`` or not.  Ends the
        promotion; the chunk is in memory if it is still indexed and ``ok``, else the slot is freed and a
        bad record (still indexed) dropped: returns the error for its waiters then, else None."""
        with self.lock:
            e.spilling, e.promoting = False, -1
            live = self.ix.get(e.kid) is e
            if ok and live:
                self.ix.set_memory(e, offset)
                self.counters["ssd_promotions"] += 1
                return None
            self.arena.free(offset, e.nbytes)
            if not live:  # a record recycled meanwhile is simply gone
                return None
            if e.ssd is not None and self.ssd is not None:
                self.ssd.drop(e.key, e.ssd)
            self.ix.remove(e)
            self.counters["checksum_failures"] += 1
            return f"chunk {e.kid} failed its checksum on SSD and was dropped; recompute it"

    def close(self) -> None:
        publisher = getattr(self, "events_publisher", None)  # (absent if the constructor failed early)
        if publisher is not None:
            publisher.close()
        if self.ix.events is not None:
            self.ix.events.close()
        if self.promoter is not None:
            self.promoter.close()
        self.closing = True  # the spiller stops waiting for quiet and drains its queue
        if self._spiller is not None:
            self._spill_q.put(None)
            self._spiller.join(timeout=10)
        if self.ssd is not None:
            self.ssd.close()
        d = self.ix.directory
        if d is not None:  # a spiller that outlived its join sees no directory, not a closed one
            with self.lock:
                self.ix.directory = None
            d.close()
        self.pool.close()
        if self.audit is not None:
            self.audit.close()
