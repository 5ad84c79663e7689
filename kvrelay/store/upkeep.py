"""The end of a chunk's life: release, delete, purge, the expiry sweep (reservations, pins, TTLs), and the
stats that count it all.

Owns: `Upkeep` (the rules that end a chunk's or a pin's life; busy and pinned chunks are never dropped).
Must not touch: admission and commit (admission.py, commit.py), sockets (server.py).  Runs under the
store's lock, on the control thread; expiry reads the store's clock.
"""

from __future__ import annotations

from typing import Any

from kvrelay.keys import ChunkKey, kid_of
from kvrelay.store.allocation import Allocation
from kvrelay.store.shared import CoreState


class Upkeep:
    def __init__(self, st: CoreState, alloc: Allocation) -> None:
        self.st = st
        self.alloc = alloc

    def release(self, request_id: str, keys: list[ChunkKey]) -> int:
        """Give back a request's reservations (not busy nor pinned) and the leases on ``keys``."""
        st = self.st
        ix = st.ix
        n = 0
        with st.lock:
            for kid in list(ix.requests.get(request_id, ())) if request_id else []:
                e = ix.entries[kid]
                if e.pins == 0 and not e.is_busy:
                    self.alloc.drop(e)
                    n += 1
            wanted = {kid_of(k) for k in keys}
            for pid, p in list(ix.pins.items()):
                if p.lease and p.kid in wanted:
                    ix.drop_pin(pid)
                    n += 1
        return n

    def delete(self, keys: list[ChunkKey]) -> int:
        """Drop these ready chunks from memory and SSD; pinned (being pulled, leased), busy or still reserved
        ones stay.  Returns how many were dropped."""
        st = self.st
        with st.lock:
            victims = [e for k in keys if (e := st.ix.get(kid_of(k))) is not None and e.pins == 0
                       and not e.is_busy and e.ready]
            for e in {e.kid: e for e in victims}.values():
                self.alloc.drop(e)
            st.counters["purged"] += len(victims)
            return len(victims)

    def purge(self, prefix: str | None, namespace: str | None) -> int:
        st = self.st
        with st.lock:
            # reserved slots may still be being written by their publisher: only READY chunks go
            victims = [e for e in st.ix.entries.values() if e.pins == 0 and not e.is_busy and e.ready
                       and (prefix is None or e.key.block_hash.startswith(prefix))
                       and (namespace is None or e.namespace == namespace)]
            for e in victims:
                self.alloc.drop(e)
            st.counters["purged"] += len(victims)
            return len(victims)

    def sweep(self) -> None:
        """Expire reservations, pins and (with chunk_ttl or tenant TTLs) idle chunks."""
        st = self.st
        ix, counters = st.ix, st.counters
        now = st.clock.monotonic()
        with st.lock:
            for pid, p in list(ix.pins.items()):
                if p.expires <= now:
                    ix.drop_pin(pid)
                    counters["lease_expiries" if p.lease else "pull_pin_expiries"] += 1
            for kids in list(ix.requests.values()):
                for kid in list(kids):
                    e = ix.entries[kid]
                    if e.deadline <= now and e.pins == 0 and not e.is_busy:
                        self.alloc.drop(e)
                        counters["reservation_expiries"] += 1
            chunk_ttl = st.cfg.chunk_ttl
            if chunk_ttl or st.policy.has_ttls:  # per tenant (tenants.py), else chunk_ttl
                ttl = st.policy.ttl
                for e in [e for e in ix.entries.values() if e.ready and e.pins == 0 and not e.is_busy
                          and (t := ttl(e.tenant, chunk_ttl)) and now - e.last_access > t]:
                    self.alloc.drop(e)
                    counters["ttl_expiries"] += 1
                    ix.book.count(e.tenant, "ttl_expiries")

    def stats(self) -> dict[str, Any]:
        """The index's, pool's and SSD tier's figures and the counters (the core adds the rest)."""
        st = self.st
        ssd = st.ssd
        with st.lock:
            ix = st.ix
            return {"pool_bytes": st.arena.capacity, "pool_used_bytes": st.arena.used,
                    "memory_chunks": len(ix.lru), "memory_bytes": ix.mem_bytes,
                    "reserved_chunks": sum(len(v) for v in ix.requests.values()), "reserved_bytes": ix.reserved_bytes,
                    "ssd_chunks": ix.ssd_chunks, "ssd_bytes": ix.ssd_bytes, "chunks": len(ix.entries),
                    "pins": len(ix.pins),
                    "ssd_direct": bool(ssd and ssd.direct),
                    "ssd_bytes_written": ssd.bytes_written if ssd else 0,
                    "ssd_write_seconds": ssd.write_seconds if ssd else 0.0,
                    "ssd_bytes_read": ssd.bytes_read if ssd else 0,
                    "ssd_read_seconds": ssd.read_seconds if ssd else 0.0,
                    "directory_chunks": len(ix.directory.where) if ix.directory else 0,
                    "directory_misses": ix.directory.full if ix.directory else 0,
                    "tenants": ix.book.snapshot(st.policy),
                    "ssd_records_by_key": {str(k): n for k, n in ssd.records_by_key().items()} if ssd else {},
                    **dict(st.counters)}
