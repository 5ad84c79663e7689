"""What the store core's parts share (`CoreState`): the config, one lock, one clock, the index, the pool and
its allocator, the SSD tier, the counters and the tenant policy.

Owns: the bundle and the counter names.  Must not touch: the rules, which live in the parts
(admission.py, allocation.py, commit.py, pins.py, tiering.py, upkeep.py) that each take this state; every
part changes the index only with ``lock`` held.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from kvrelay.store.clock import Clock
from kvrelay.store.config import StoreConfig
from kvrelay.store.index import Index
from kvrelay.store.pool import Arena, SharedPool
from kvrelay.store.ssd import SsdTier
from kvrelay.store.tenants import TenantPolicy

COUNTERS = ("lookups", "lookup_hits", "lookup_chunks", "lookup_chunks_hit", "commits", "pulls", "admission_refusals",
            "evictions_memory", "evictions_dropped", "evictions_ssd", "checksum_failures", "ssd_promotions",
            "lease_expiries", "pull_pin_expiries", "reservation_expiries", "ttl_expiries", "purged", "spill_errors",
            "bad_requests", "aborts", "mismatches", "local_pulls")


def new_counters() -> Counter[str]:
    return Counter(dict.fromkeys(COUNTERS, 0))


@dataclass(eq=False)
class CoreState:
    cfg: StoreConfig
    clock: Clock
    lock: threading.RLock
    ix: Index
    pool: SharedPool
    arena: Arena
    counters: Counter[str] = field(default_factory=new_counters)
    policy: TenantPolicy = field(default_factory=TenantPolicy)
    ssd: SsdTier | None = None  # set once the SSD tier is recovered (before any request)
