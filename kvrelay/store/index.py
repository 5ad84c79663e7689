"""The store's index: every chunk's entry, the LRU of in-memory chunks, pins, and the bytes per tier.

Owns: `Index` (plain data structures with O(1) lookups; the caller holds the lock) and its accounting: it
moves an entry between tiers (through the entry's checked transitions, lifecycle.py) and keeps the byte
counts, the tenant book, the shared directory and the KV-event hooks in step.  Must not touch: pool bytes,
SSD files or sockets.

Only READY in-memory entries (MEMORY, BOTH) are in the LRU.  ``pins`` counts leases and in-flight pulls:
a pinned entry is never evicted, purged or freed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from kvrelay.store.directory import Directory
from kvrelay.store.lifecycle import Entry, Tier
from kvrelay.store.ssd_format import Loc
from kvrelay.store.tenants import TenantBook
from kvrelay.transfer.wire import ChunkHeader


@dataclass(slots=True)
class Pin:
    kid: str
    expires: float
    lease: bool  # a client lease (True) or a pull pin (False)


@dataclass
class Index:
    entries: dict[str, Entry] = field(default_factory=dict)
    lru: "OrderedDict[str, None]" = field(default_factory=OrderedDict)  # READY and in memory, oldest first
    requests: dict[str, set[str]] = field(default_factory=dict)  # request_id -> reserved kids
    pins: dict[int, Pin] = field(default_factory=dict)
    next_pin: int = 1
    mem_bytes: int = 0  # bytes of READY chunks in memory
    reserved_bytes: int = 0
    ssd_chunks: int = 0
    ssd_bytes: int = 0
    directory: "Directory | None" = None  # shared map of READY in-memory chunks (directory.py)
    book: TenantBook = field(default_factory=TenantBook)  # the same bytes per tenant, and each tenant's LRU
    events: Any = None  # kvrelay.events.store.StoreEvents: told each READY chunk's tier changes (KV events)

    def get(self, kid: str) -> Entry | None:
        return self.entries.get(kid)

    def live(self, kid: str, serial: int) -> Entry | None:
        """The entry of ``kid`` if it is still the one numbered ``serial`` (not dropped and replaced)."""
        e = self.entries.get(kid)
        return e if e is not None and e.serial == serial else None

    def touch(self, e: Entry, now: float) -> None:
        e.last_access = now
        if e.kid in self.lru:
            self.lru.move_to_end(e.kid)
            self.book.touch(e.tenant, e.kid)

    def add_reserved(self, e: Entry) -> None:
        """A new entry (Entry.reserved: tier RESERVED)."""
        self.entries[e.kid] = e
        self.reserved_bytes += e.nbytes
        self.requests.setdefault(e.request_id, set()).add(e.kid)
        self.book.change(e.tenant, e.kid, e.nbytes, "reserved", 1)

    def mark_ready(self, e: Entry, header: ChunkHeader, now: float, verified: bool) -> None:
        """RESERVED -> MEMORY."""
        e.mark_ready(header, now, verified)
        self.reserved_bytes -= e.nbytes
        self._forget_request(e)
        self.book.change(e.tenant, e.kid, e.nbytes, "reserved", -1)
        self._memory_in(e)
        if self.events is not None:
            self.events.memory(e, False, True)

    def add_recovered(self, e: Entry) -> None:
        """An entry found on SSD at start-up (tier SSD)."""
        if e.tier is not Tier.SSD:
            raise ValueError(f"add_recovered of {e!r}")
        self.entries[e.kid] = e
        self._ssd_in(e)
        if self.events is not None:
            self.events.ssd(e, False, True)

    def ssd_gained(self, e: Entry, loc: Loc) -> None:
        """MEMORY -> BOTH: the spiller wrote it at ``loc``."""
        e.gain_ssd(loc)
        self._ssd_in(e)
        if self.events is not None:
            self.events.ssd(e, False, True)

    def ssd_lost(self, e: Entry) -> None:
        """BOTH -> MEMORY: the SSD reclaimed its record."""
        if self.events is not None:
            self.events.ssd(e, True, False)
        e.lose_ssd()
        self._ssd_out(e)

    def memory_gained(self, e: Entry, offset: int) -> None:
        """SSD -> BOTH: read back into the pool slot at ``offset``."""
        if self.events is not None:
            self.events.memory(e, False, True)
        e.gain_memory(offset)
        self._memory_in(e)

    def memory_lost(self, e: Entry) -> None:
        """BOTH -> SSD: its clean pool copy was evicted (the caller frees the slot)."""
        if self.events is not None:
            self.events.memory(e, True, False)
        self._memory_out(e)
        e.lose_memory()

    def remove(self, e: Entry) -> None:
        """Forget an entry, whatever its tier (the caller frees its pool slot and SSD record)."""
        if self.events is not None and self.entries.get(e.kid) is e:
            self.events.removed(e, e.ready)
        self.entries.pop(e.kid, None)
        self.lru.pop(e.kid, None)
        if self.directory is not None:
            self.directory.drop(e.kid)
        if e.tier is Tier.RESERVED:
            self.reserved_bytes -= e.nbytes
            self._forget_request(e)
            self.book.change(e.tenant, e.kid, e.nbytes, "reserved", -1)
        elif e.in_memory:
            self.mem_bytes -= e.nbytes
            self.book.change(e.tenant, e.kid, e.nbytes, "memory", -1)
        if e.on_ssd:
            self._ssd_out(e)

    def _memory_in(self, e: Entry) -> None:
        self.mem_bytes += e.nbytes
        self.lru[e.kid] = None
        self.book.change(e.tenant, e.kid, e.nbytes, "memory", 1)
        if self.directory is not None:
            self.directory.put(e.kid, e.offset, e.nbytes, e.header)

    def _memory_out(self, e: Entry) -> None:
        self.mem_bytes -= e.nbytes
        self.lru.pop(e.kid, None)
        self.book.change(e.tenant, e.kid, e.nbytes, "memory", -1)
        if self.directory is not None:
            self.directory.drop(e.kid)

    def _ssd_in(self, e: Entry) -> None:
        self.ssd_chunks += 1
        self.ssd_bytes += e.nbytes
        self.book.change(e.tenant, e.kid, e.nbytes, "ssd", 1)

    def _ssd_out(self, e: Entry) -> None:
        self.ssd_chunks -= 1
        self.ssd_bytes -= e.nbytes
        self.book.change(e.tenant, e.kid, e.nbytes, "ssd", -1)

    def _forget_request(self, e: Entry) -> None:
        kids = self.requests.get(e.request_id)
        if kids is not None:
            kids.discard(e.kid)
            if not kids:
                del self.requests[e.request_id]

    def add_pin(self, e: Entry, expires: float, lease: bool) -> int:
        pid = self.next_pin
        self.next_pin += 1
        self.pins[pid] = Pin(e.kid, expires, lease)
        e.pins += 1
        return pid

    def drop_pin(self, pid: int) -> Pin | None:
        p = self.pins.pop(pid, None)
        if p is not None:
            e = self.entries.get(p.kid)
            if e is not None:
                e.pins -= 1
        return p
