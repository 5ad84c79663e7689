"""The store's upkeep: leases, unpins, release, delete, purge, expiry sweeps and stats (a StoreCore mixin).

Owns: the rules that end a chunk's or a pin's life.  Must not touch: admission and commit (core.py),
sockets (server.py).  Runs under StoreCore's lock, on the control thread.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from kvrelay.keys import ChunkKey, kid_of
from kvrelay.store.config import StoreConfig
from kvrelay.events.store import events_stats
from kvrelay.store.index import Entry, Index, OpError, State
from kvrelay.store.pool import Arena
from kvrelay.store.ssd import SsdTier
from kvrelay.store.tenants import TenantPolicy


class Upkeep:
    # StoreCore's state that upkeep works on (set by StoreCore.__init__ and _start)
    cfg: StoreConfig
    lock: threading.RLock
    ix: Index
    arena: Arena
    ssd: SsdTier | None
    counters: Counter[str]
    recovered: int
    recover_dropped: int
    last_spill_error: str
    policy: TenantPolicy

    def lease(self, keys: list[ChunkKey], ttl: float) -> list[int]:
        if not 0 < ttl <= 86400:
            raise OpError("bad_request", f"lease ttl {ttl} must be in (0, 86400] seconds")
        now = time.monotonic()
        with self.lock:
            out = []
            for k in keys:
                e = self.ix.get(kid_of(k))
                if e is None:
                    raise OpError("not_found", f"lease of {kid_of(k)}: unknown chunk")
                out.append(self.ix.add_pin(e, now + ttl, lease=True))
            return out

    def unpin(self, pids: list[int]) -> None:
        with self.lock:
            for p in pids:
                self.ix.drop_pin(p)

    def release(self, request_id: str, keys: list[ChunkKey]) -> int:
        n = 0
        with self.lock:
            for kid in list(self.ix.requests.get(request_id, ())) if request_id else []:
                e = self.ix.entries[kid]
                if e.pins == 0 and not e.spilling:
                    self._drop(e)
                    n += 1
            wanted = {kid_of(k) for k in keys}
            for pid, p in list(self.ix.pins.items()):
                if p.lease and p.kid in wanted:
                    self.ix.drop_pin(pid)
                    n += 1
        return n

    def delete(self, keys: list[ChunkKey]) -> int:
        """Drop these ready chunks from memory and SSD; pinned (being pulled, leased) or still reserved ones
        stay.  Returns how many were dropped."""
        with self.lock:
            victims = [e for k in keys if (e := self.ix.get(kid_of(k))) is not None and e.pins == 0
                       and not e.spilling and e.state is State.READY]
            for e in {e.kid: e for e in victims}.values():
                self._drop(e)
            self.counters["purged"] += len(victims)
            return len(victims)

    def purge(self, prefix: str | None, namespace: str | None) -> int:
        with self.lock:
            # reserved slots may still be being written by their publisher: only READY chunks go
            victims = [e for e in self.ix.entries.values() if e.pins == 0 and not e.spilling
                       and e.state is State.READY
                       and (prefix is None or e.key.block_hash.startswith(prefix))
                       and (namespace is None or e.namespace == namespace)]
            for e in victims:
                self._drop(e)
            self.counters["purged"] += len(victims)
            return len(victims)

    def _drop(self, e: Entry) -> None:
        if e.offset >= 0:
            self.arena.free(e.offset, e.nbytes)
        if e.ssd is not None and self.ssd is not None:
            self.ssd.drop(e.key, e.ssd)
        self.ix.remove(e)

    def sweep(self) -> None:
        """Expire reservations, pins and (with chunk_ttl) idle chunks."""
        now = time.monotonic()
        with self.lock:
            for pid, p in list(self.ix.pins.items()):
                if p.expires <= now:
                    self.ix.drop_pin(pid)
                    self.counters["lease_expiries" if p.lease else "pull_pin_expiries"] += 1
            for kids in list(self.ix.requests.values()):
                for kid in list(kids):
                    e = self.ix.entries[kid]
                    if e.deadline <= now and e.pins == 0 and not e.spilling:
                        self._drop(e)
                        self.counters["reservation_expiries"] += 1
            if self.cfg.chunk_ttl or self.policy.has_ttls:  # per tenant (tenants.py), else chunk_ttl
                ttl = self.policy.ttl
                for e in [e for e in self.ix.entries.values() if e.state is State.READY and e.pins == 0
                          and not e.spilling and (t := ttl(e.tenant, self.cfg.chunk_ttl))
                          and now - e.last_access > t]:
                    self._drop(e)
                    self.counters["ttl_expiries"] += 1
                    self.ix.book.count(e.tenant, "ttl_expiries")

    def stats(self) -> dict[str, Any]:
        """Everything /metrics and `kvrelay status` show; "events": the KV-event publisher's counters."""
        with self.lock:
            ix = self.ix
            return {"pool_bytes": self.arena.capacity, "pool_used_bytes": self.arena.used,
                    "memory_chunks": len(ix.lru), "memory_bytes": ix.mem_bytes,
                    "reserved_chunks": sum(len(v) for v in ix.requests.values()), "reserved_bytes": ix.reserved_bytes,
                    "ssd_chunks": ix.ssd_chunks, "ssd_bytes": ix.ssd_bytes, "chunks": len(ix.entries),
                    "pins": len(ix.pins), "recovered": self.recovered, "recover_dropped": self.recover_dropped,
                    "ssd_direct": bool(self.ssd and self.ssd.direct), "last_spill_error": self.last_spill_error,
                    "ssd_bytes_written": self.ssd.bytes_written if self.ssd else 0,
                    "ssd_write_seconds": self.ssd.write_seconds if self.ssd else 0.0,
                    "ssd_bytes_read": self.ssd.bytes_read if self.ssd else 0,
                    "ssd_read_seconds": self.ssd.read_seconds if self.ssd else 0.0,
                    "directory_chunks": len(ix.directory.where) if ix.directory else 0,
                    "directory_misses": ix.directory.full if ix.directory else 0,
                    "tenants": ix.book.snapshot(self.policy),
                    "events": events_stats(getattr(self, "events_publisher", None), ix.events),
                    "ssd_records_by_key": {str(k): n for k, n in self.ssd.records_by_key().items()} if self.ssd else {},
                    **dict(self.counters)}
