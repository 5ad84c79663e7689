"""The store's index: every chunk's state, tier, location, pins and LRU position.

Owns: `Entry` and `Index` (plain data structures with O(1) lookups; the caller holds the lock).  Must not
touch: pool bytes, SSD files or sockets.

An entry is RESERVED (slot allocated, waiting for its commit) or READY.  A READY entry lives in memory
(``offset >= 0``), on SSD (``ssd`` set), or both (a clean in-memory copy, evictable for free).  Only
READY in-memory entries are in the LRU.  ``pins`` counts leases and in-flight pulls/spills: a pinned entry
is never evicted, purged or freed.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from kvrelay.keys import ChunkKey
from kvrelay.store.directory import Directory
from kvrelay.store.ssd import Loc
from kvrelay.store.tenants import TenantBook
from kvrelay.transfer.wire import ChunkHeader


class State(enum.Enum):
    RESERVED = 1
    READY = 2


@dataclass(slots=True)
class Entry:
    key: ChunkKey
    kid: str  # ChunkKey.encode() as str: the index key
    nbytes: int
    state: State
    offset: int = -1  # pool offset, -1 when not in memory
    header: ChunkHeader | None = None
    request_id: str = ""
    namespace: str = ""  # compat hash of the publisher
    deadline: float = 0.0  # RESERVED: reservation expiry (monotonic)
    last_access: float = 0.0
    pins: int = 0
    ssd: Loc | None = None
    spilling: bool = False
    promoting: int = -1  # pool offset being filled from SSD (promote.py), -1 when not
    verified: bool = True  # False: a same-host commit not re-hashed (the spiller checks it before the SSD)
    tenant: str = ""  # the publisher's cache_salt (tenants.py): whose quota, TTL, metrics and purge it falls under


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

    def touch(self, e: Entry, now: float) -> None:
        e.last_access = now
        if e.kid in self.lru:
            self.lru.move_to_end(e.kid)
            self.book.touch(e)

    def add_reserved(self, e: Entry) -> None:
        self.entries[e.kid] = e
        self.reserved_bytes += e.nbytes
        self.requests.setdefault(e.request_id, set()).add(e.kid)
        self.book.change(e, "reserved", 1)

    def mark_ready(self, e: Entry, header: ChunkHeader, now: float) -> None:
        self.reserved_bytes -= e.nbytes
        self._forget_request(e)
        e.state, e.header, e.last_access = State.READY, header, now
        self.mem_bytes += e.nbytes
        self.lru[e.kid] = None
        self.book.change(e, "reserved", -1)
        self.book.change(e, "memory", 1)
        if self.directory is not None and e.offset >= 0:
            self.directory.put(e.kid, e.offset, e.nbytes, header)
        if self.events is not None:
            self.events.memory(e, False, e.offset >= 0)

    def add_recovered(self, e: Entry) -> None:
        self.entries[e.kid] = e
        loc, e.ssd = e.ssd, None  # counted once (set_ssd first uncounts an entry's previous location)
        self.set_ssd(e, loc)

    def set_ssd(self, e: Entry, loc: Loc | None) -> None:
        if self.events is not None:
            self.events.ssd(e, e.ssd is not None, loc is not None)
        if e.ssd is not None:
            self.ssd_chunks -= 1
            self.ssd_bytes -= e.nbytes
            self.book.change(e, "ssd", -1)
        e.ssd = loc
        if loc is not None:
            self.ssd_chunks += 1
            self.ssd_bytes += e.nbytes
            self.book.change(e, "ssd", 1)

    def set_memory(self, e: Entry, offset: int) -> None:
        """A READY entry gains (offset >= 0) or loses (offset = -1) its in-memory copy."""
        if self.events is not None:
            self.events.memory(e, e.offset >= 0, offset >= 0)
        if e.offset >= 0:
            self.mem_bytes -= e.nbytes
            self.lru.pop(e.kid, None)
            self.book.change(e, "memory", -1)
            if self.directory is not None:
                self.directory.drop(e.kid)
        e.offset = offset
        if offset >= 0:
            self.mem_bytes += e.nbytes
            self.lru[e.kid] = None
            self.book.change(e, "memory", 1)
            if self.directory is not None:
                self.directory.put(e.kid, offset, e.nbytes, e.header)

    def remove(self, e: Entry) -> None:
        """Forget an entry (the caller frees its pool slot and SSD record)."""
        if self.events is not None and self.entries.get(e.kid) is e:
            self.events.removed(e, e.state is State.READY)
        self.entries.pop(e.kid, None)
        self.lru.pop(e.kid, None)
        if self.directory is not None:
            self.directory.drop(e.kid)
        if e.state is State.RESERVED:
            self.reserved_bytes -= e.nbytes
            self._forget_request(e)
            self.book.change(e, "reserved", -1)
        elif e.offset >= 0:
            self.mem_bytes -= e.nbytes
            self.book.change(e, "memory", -1)
        if e.ssd is not None:
            self.ssd_chunks -= 1
            self.ssd_bytes -= e.nbytes
            self.book.change(e, "ssd", -1)

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


class OpError(Exception):
    """A request the store refuses; ``code`` goes into the reply (bad_request, full, not_found, corrupt)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
