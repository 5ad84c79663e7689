"""The store's logic as one facade (`StoreCore`) over parts that each own one job, sharing one lock and one
clock (shared.py `CoreState`):

* admission.py -- reservations, all or nothing, within the pool and the tenant's quota;
* allocation.py -- pool slots, made by evicting unpinned LRU chunks (clean ones first), and drops;
* commit.py -- commits, with or without re-hashing the slot;
* pins.py -- lookups, pulls (pull pins), leases and unpins;
* tiering.py -- the spill/promote interface the background threads (spill.py, promote.py) use;
* upkeep.py -- the end of life: release, delete, purge, expiry sweeps, stats.

A chunk's state is its entry's `Tier` and `Busy` (lifecycle.py), changed only through checked transitions.

Owns: building the parts, recovery from SSD at start-up, the KV-event publisher's start, and close.  Must
not touch: sockets (server.py), the on-disk format (ssd.py) or the allocator internals (pool.py).
"""

from __future__ import annotations

import platform
import threading
from typing import TYPE_CHECKING, Any, Sequence

from kvrelay.events.store import events_stats
from kvrelay.keys import ChunkKey, kid_of
from kvrelay.store.admission import Admission
from kvrelay.store.allocation import Allocation
from kvrelay.store.audit import AuditLog
from kvrelay.store.clock import Clock, SystemClock
from kvrelay.store.commit import Commit
from kvrelay.store.config import StoreConfig, parse_size
from kvrelay.store.crypto import KeyRing
from kvrelay.store.directory import Directory, slots_for
from kvrelay.store.errors import OpError
from kvrelay.store.index import Index
from kvrelay.store.lifecycle import Entry
from kvrelay.store.pins import Pins
from kvrelay.store.pool import Arena, SharedPool
from kvrelay.store.promote import Promoter
from kvrelay.store.protocol import Slot
from kvrelay.store.shared import CoreState
from kvrelay.store.ssd import SsdTier
from kvrelay.store.tenants import TenantPolicy, parse_per_tenant
from kvrelay.store.tiering import Tiering
from kvrelay.store.upkeep import Upkeep
from kvrelay.transfer.wire import ChunkHeader

if TYPE_CHECKING:
    from collections import Counter

    from kvrelay.events.publisher import EventPublisher


class StoreCore:
    audit: AuditLog | None = None

    def __init__(self, cfg: StoreConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.pool = SharedPool(cfg.pool_name, cfg.pool_size, create=True)
        self.st = CoreState(cfg, clock if clock is not None else SystemClock(), threading.RLock(), Index(),
                            self.pool, Arena(cfg.pool_size))
        self.alloc = Allocation(self.st)
        self.tiering = Tiering(self.st, self.alloc)
        self.admission = Admission(self.st, self.alloc)
        self.commits = Commit(self.st, self.tiering)
        self.pins = Pins(self.st, self.tiering)
        self.upkeep = Upkeep(self.st, self.alloc)
        self.events_publisher: EventPublisher | None = None
        self.recovered = self.recover_dropped = 0
        try:
            self._start(cfg)
        except BaseException:  # no pool or directory left behind in /dev/shm by a daemon that did not start
            self.close()
            raise

    def _start(self, cfg: StoreConfig) -> None:
        st = self.st
        quotas, default_quota = parse_per_tenant(cfg.tenant_quotas, "tenant_quotas", lambda v: parse_size(v, "size"))
        ttls, default_ttl = parse_per_tenant(cfg.tenant_ttls, "tenant_ttls", float)
        st.policy = TenantPolicy(quotas, default_quota, ttls, default_ttl)
        st.ix.book.max_labels = cfg.max_tenant_labels
        self.keyring = KeyRing.load(cfg.at_rest_key) if cfg.at_rest_key else None
        self.audit = AuditLog(cfg.audit_log) if cfg.audit_log else None
        if cfg.directory and platform.machine() in ("x86_64", "AMD64"):
            st.ix.directory = Directory(cfg.pool_name, slots_for(cfg.pool_size), self.pool.ident)
        if cfg.events:  # before SSD recovery: the chunks recovered whole are announced again (kvrelay.events)
            from kvrelay.events.store import StoreEvents
            st.ix.events = StoreEvents(cfg.events_block_size, cfg.ssd_dir)
        if cfg.ssd_dir:
            st.ssd = SsdTier(cfg.ssd_dir, cfg.ssd_size, cfg.ssd_segment_size, cfg.ssd_direct, cfg.ssd_fsync,
                             self.keyring)
            now = st.clock.monotonic()
            recs, self.recover_dropped = st.ssd.recover()
            for r in recs:
                st.ix.add_recovered(Entry.recovered(r.key, kid_of(r.key), r.header, r.loc, now, r.tenant))
            self.recovered = len(recs)
            self.tiering.start(st.ssd)
        if st.ix.events is not None:
            from kvrelay.events.store import start_publisher
            self.events_publisher = start_publisher(st.ix.events, cfg, st.lock)

    # --- the shared state, for the server, purge.py and the daemon ----------------------------------
    @property
    def lock(self) -> threading.RLock:
        return self.st.lock

    @property
    def clock(self) -> Clock:
        return self.st.clock

    @property
    def ix(self) -> Index:
        return self.st.ix

    @property
    def arena(self) -> Arena:
        return self.st.arena

    @property
    def ssd(self) -> SsdTier | None:
        return self.st.ssd

    @property
    def counters(self) -> Counter[str]:
        return self.st.counters

    @property
    def policy(self) -> TenantPolicy:
        return self.st.policy

    @property
    def capacity(self) -> int:
        """The pool's size in bytes."""
        return self.st.arena.capacity

    @property
    def promoter(self) -> Promoter | None:
        return self.tiering.promoter

    @property
    def closing(self) -> bool:
        return self.tiering.closing

    @property
    def last_activity(self) -> float:
        """When the server last handled a request (the spiller writes when it has been quiet a while)."""
        return self.tiering.last_activity

    @last_activity.setter
    def last_activity(self, when: float) -> None:
        self.tiering.last_activity = when

    @property
    def spill_backlog(self) -> int:
        return self.tiering.spill_backlog

    @property
    def last_spill_error(self) -> str:
        return self.tiering.last_spill_error

    # --- requests (each part documents its rules) --------------------------------------------------
    def lookup(self, keys: list[ChunkKey], record: bool = True, tenant: str = "") -> int:
        return self.pins.lookup(keys, record, tenant)

    def reserve(self, request_id: str, keys: list[ChunkKey], sizes: list[int], ttl: float,
                namespace: str, tenant: str = "", tokens: Sequence[int] = ()) -> list[Slot]:
        return self.admission.reserve(request_id, keys, sizes, ttl, namespace, tenant, tokens)

    def commit(self, key: ChunkKey, header: ChunkHeader, namespace: str, verify: bool = True) -> bool:
        return self.commits.commit(key, header, namespace, verify)

    def commit_many(self, keys: list[ChunkKey], headers: list[ChunkHeader], namespace: str,
                    verify: bool) -> tuple[list[str], list[OpError]]:
        return self.commits.commit_many(keys, headers, namespace, verify)

    def acquire(self, key: ChunkKey) -> tuple[Slot, ChunkHeader] | None:
        return self.pins.acquire(key)

    def acquire_many(self, keys: list[ChunkKey], max_bytes: int = 0) -> tuple[list[Slot], list[ChunkHeader]] | int:
        return self.pins.acquire_many(keys, max_bytes)

    def touched(self, kids: list[str]) -> None:
        self.pins.touched(kids)

    def lease(self, keys: list[ChunkKey], ttl: float) -> list[int]:
        return self.pins.lease(keys, ttl)

    def unpin(self, pids: list[int]) -> None:
        self.pins.unpin(pids)

    def release(self, request_id: str, keys: list[ChunkKey]) -> int:
        return self.upkeep.release(request_id, keys)

    def delete(self, keys: list[ChunkKey]) -> int:
        return self.upkeep.delete(keys)

    def purge(self, prefix: str | None, namespace: str | None) -> int:
        return self.upkeep.purge(prefix, namespace)

    def drop(self, e: Entry, scrub: bool = False) -> None:
        """Forget a chunk and free its slot and SSD record (lock held; purge.py)."""
        self.alloc.drop(e, scrub)

    def sweep(self) -> None:
        self.upkeep.sweep()

    def stats(self) -> dict[str, Any]:
        """Everything /metrics and `kvrelay status` show; "events": the KV-event publisher's counters."""
        with self.st.lock:
            return {**self.upkeep.stats(), "recovered": self.recovered, "recover_dropped": self.recover_dropped,
                    "last_spill_error": self.tiering.last_spill_error,
                    "events": events_stats(self.events_publisher, self.st.ix.events)}

    def close(self) -> None:
        if self.events_publisher is not None:
            self.events_publisher.close()
        if self.st.ix.events is not None:
            self.st.ix.events.close()
        self.tiering.close()  # the promoter stops; the spiller drains its queue and stops
        if self.st.ssd is not None:
            self.st.ssd.close()
        d = self.st.ix.directory
        if d is not None:  # a spiller that outlived its join sees no directory, not a closed one
            with self.st.lock:
                self.st.ix.directory = None
            d.close()
        self.pool.close()
        if self.audit is not None:
            self.audit.close()
