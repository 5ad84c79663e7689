"""A stored chunk's life: where it lives (`Tier`), what is busy with it (`Busy`), and `Entry`, whose
transitions check both.

Owns: the tiers and busy reasons and the only methods that change them.  Must not touch: the index's
accounting (index.py calls these methods where it moves an entry between tiers and counts the bytes),
locks (the caller holds the store's lock), pool bytes or SSD files.

Tiers::

    (reserve) -> RESERVED --ready--> MEMORY --gain_ssd--> BOTH --lose_memory--> SSD
                                        ^                  |  ^                  |
                                        +----lose_ssd------+  +---gain_memory----+

A RESERVED entry holds a pool slot its publisher is writing; MEMORY, SSD and BOTH are READY (readable).
An entry whose last copy goes is removed from the index, not moved to a tier.  Busy: while a commit
re-hashes a RESERVED slot (VERIFYING), the spiller writes a MEMORY chunk to SSD (SPILLING) or the promoter
reads an SSD chunk back into a new slot (PROMOTING), the entry is neither evicted, purged nor expired.
An illegal transition raises `IllegalTransition` (a bug in the caller, never a client's error).
"""

from __future__ import annotations

import enum
import itertools

from kvrelay.keys import ChunkKey
from kvrelay.store.ssd_format import Loc
from kvrelay.transfer.wire import ChunkHeader


class Tier(enum.Enum):
    RESERVED = "reserved"  # a pool slot allocated, waiting for its commit
    MEMORY = "memory"  # ready, only in the pool (dirty: not on SSD yet)
    SSD = "ssd"  # ready, only on SSD
    BOTH = "both"  # ready, in the pool and on SSD (the pool copy is clean: evictable for free)


class Busy(enum.Enum):
    NONE = "none"
    VERIFYING = "verifying"  # a commit re-hashes the RESERVED slot without the lock
    SPILLING = "spilling"  # the spiller writes the MEMORY chunk to SSD
    PROMOTING = "promoting"  # the promoter reads the SSD chunk into a new pool slot


_BUSY_TIER = {Busy.VERIFYING: Tier.RESERVED, Busy.SPILLING: Tier.MEMORY, Busy.PROMOTING: Tier.SSD}
_IN_POOL = frozenset({Tier.RESERVED, Tier.MEMORY, Tier.BOTH})
_serials = itertools.count(1)


class IllegalTransition(RuntimeError):
    """A chunk was asked to move in a way its lifecycle forbids (a bug in the store, not the client)."""


class Entry:
    """One chunk in the index.  ``serial`` tells this entry from a later one of the same key (the plain
    values handed to the background threads carry it)."""

    __slots__ = ("key", "kid", "nbytes", "header", "request_id", "namespace", "deadline", "last_access", "pins",
                 "tenant", "serial", "_tier", "_busy", "_offset", "_loc", "_promote_to", "_verified")

    def __init__(self, key: ChunkKey, kid: str, nbytes: int, tier: Tier, offset: int = -1,
                 loc: Loc | None = None, header: ChunkHeader | None = None, request_id: str = "",
                 namespace: str = "", deadline: float = 0.0, last_access: float = 0.0, tenant: str = "") -> None:
        if tier is Tier.RESERVED:
            if offset < 0 or loc is not None:
                raise IllegalTransition(f"chunk {kid}: a RESERVED entry needs a pool offset and no SSD record "
                                        f"(offset {offset}, record {loc})")
        elif tier is Tier.SSD:
            if offset >= 0 or loc is None or header is None:
                raise IllegalTransition(f"chunk {kid}: a recovered entry needs an SSD record and header and no "
                                        f"pool offset (offset {offset}, record {loc})")
        else:
            raise IllegalTransition(f"chunk {kid}: an entry starts RESERVED or (recovered) on SSD, not {tier.name}")
        self.key = key
        self.kid = kid  # ChunkKey.encode() as str: the index key
        self.nbytes = nbytes
        self.header = header
        self.request_id = request_id
        self.namespace = namespace  # compat hash of the publisher
        self.deadline = deadline  # RESERVED: reservation expiry (the store clock's monotonic time)
        self.last_access = last_access
        self.pins = 0  # leases and pull pins (index.py): a pinned entry is never evicted, purged or freed
        self.tenant = tenant  # the publisher's cache_salt (tenants.py)
        self.serial = next(_serials)
        self._tier: Tier = tier
        self._busy: Busy = Busy.NONE
        self._offset = offset
        self._loc: Loc | None = loc
        self._promote_to = -1
        self._verified = True  # False: committed without a re-hash (the spiller checks it before the SSD)

    @classmethod
    def reserved(cls, key: ChunkKey, kid: str, nbytes: int, offset: int, *, request_id: str, namespace: str,
                 deadline: float, now: float, tenant: str) -> Entry:
        return cls(key, kid, nbytes, Tier.RESERVED, offset, None, None, request_id, namespace, deadline, now, tenant)

    @classmethod
    def recovered(cls, key: ChunkKey, kid: str, header: ChunkHeader, loc: Loc, now: float, tenant: str) -> Entry:
        return cls(key, kid, header.nbytes, Tier.SSD, -1, loc, header, "", header.compat_hash, 0.0, now, tenant)

    def __repr__(self) -> str:
        return f"Entry({self.kid}, {self.nbytes} B, {self._tier.name}, busy {self._busy.name}, pins {self.pins})"

    # --- reads -------------------------------------------------------------------------------------
    @property
    def tier(self) -> Tier:
        return self._tier

    @property
    def busy(self) -> Busy:
        return self._busy

    @property
    def is_busy(self) -> bool:
        return self._busy is not Busy.NONE

    @property
    def ready(self) -> bool:
        """Committed (readable): MEMORY, SSD or BOTH."""
        return self._tier is not Tier.RESERVED

    @property
    def in_pool(self) -> bool:
        """Holds a pool slot (RESERVED, MEMORY or BOTH): ``offset`` is its start."""
        return self._tier in _IN_POOL

    @property
    def in_memory(self) -> bool:
        """Ready and in the pool (MEMORY or BOTH)."""
        return self._tier is Tier.MEMORY or self._tier is Tier.BOTH

    @property
    def on_ssd(self) -> bool:
        """Has an SSD record (SSD or BOTH): ``loc`` is where."""
        return self._tier is Tier.SSD or self._tier is Tier.BOTH

    @property
    def dirty(self) -> bool:
        """Ready only in memory: evicting it loses it."""
        return self._tier is Tier.MEMORY

    @property
    def offset(self) -> int:
        """The pool slot's offset, -1 when the entry holds none."""
        return self._offset

    @property
    def loc(self) -> Loc | None:
        """The SSD record, None when the entry has none."""
        return self._loc

    @property
    def promote_to(self) -> int:
        """PROMOTING: the pool slot being filled from SSD; else -1."""
        return self._promote_to

    def evictable(self, dirty_ok: bool) -> bool:
        """In memory and free to lose its pool copy now: unpinned, not busy, and clean (on SSD too) unless
        ``dirty_ok``.  (One call on the eviction scan's hot path.)"""
        tier = self._tier
        return (not self.pins and self._busy is Busy.NONE
                and (tier is Tier.BOTH or (dirty_ok and tier is Tier.MEMORY)))

    @property
    def verified(self) -> bool:
        """False: committed without a re-hash of its slot, and not re-hashed since."""
        return self._verified

    # --- tier transitions (index.py calls them where it counts the bytes) --------------------------
    def _move(self, want: Tier, to: Tier, what: str) -> None:
        if self._tier is not want:
            raise IllegalTransition(f"chunk {self.kid}: {what} needs tier {want.name}, it is {self._tier.name}")
        self._tier = to

    def mark_ready(self, header: ChunkHeader, now: float, verified: bool) -> None:
        """RESERVED -> MEMORY: committed with ``header``; ``verified``: its slot was re-hashed."""
        if self._tier is not Tier.RESERVED or self._busy is not Busy.NONE:  # (inlined: once per chunk)
            raise IllegalTransition(f"chunk {self.kid}: commit needs tier RESERVED and not busy, it is "
                                    f"{self._tier.name} and {self._busy.name}")
        self._tier = Tier.MEMORY
        self.header, self.last_access, self._verified = header, now, verified

    def gain_ssd(self, loc: Loc) -> None:
        """MEMORY -> BOTH: written to SSD at ``loc``."""
        self._move(Tier.MEMORY, Tier.BOTH, "gaining an SSD record")
        self._loc = loc

    def lose_ssd(self) -> None:
        """BOTH -> MEMORY: the SSD reclaimed its record."""
        self._move(Tier.BOTH, Tier.MEMORY, "losing its SSD record")
        self._loc = None

    def gain_memory(self, offset: int) -> None:
        """SSD -> BOTH: read back into the pool slot at ``offset``."""
        if offset < 0:
            raise IllegalTransition(f"chunk {self.kid}: pool offset {offset}")
        self._move(Tier.SSD, Tier.BOTH, "gaining a pool copy")
        self._offset = offset

    def lose_memory(self) -> None:
        """BOTH -> SSD: its clean pool copy was evicted (the caller frees the slot)."""
        self._move(Tier.BOTH, Tier.SSD, "losing its pool copy")
        self._offset = -1

    # --- busy transitions ----------------------------------------------------------------------------
    def begin(self, why: Busy, promote_to: int = -1) -> None:
        """Mark the entry busy (not evicted, purged nor expired) for ``why``; PROMOTING names the new slot."""
        if why is Busy.NONE or self._busy is not Busy.NONE:
            raise IllegalTransition(f"chunk {self.kid}: begin {why.name} while {self._busy.name}")
        if self._tier is not _BUSY_TIER[why]:
            raise IllegalTransition(f"chunk {self.kid}: {why.name} needs tier {_BUSY_TIER[why].name}, "
                                    f"it is {self._tier.name}")
        if (why is Busy.PROMOTING) != (promote_to >= 0):
            raise IllegalTransition(f"chunk {self.kid}: {why.name} with pool offset {promote_to}")
        self._busy, self._promote_to = why, promote_to

    def end(self, why: Busy) -> None:
        """The work ``why`` began is over."""
        if self._busy is not why or why is Busy.NONE:
            raise IllegalTransition(f"chunk {self.kid}: end {why.name} while {self._busy.name}")
        self._busy, self._promote_to = Busy.NONE, -1

    def mark_verified(self) -> None:
        """A chunk committed unverified was re-hashed and matched its checksum."""
        if not self.ready:
            raise IllegalTransition(f"chunk {self.kid}: verified while {self._tier.name}")
        self._verified = True
