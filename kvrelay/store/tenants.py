"""Tenants in the store: who owns each chunk, their usage, their quotas and TTLs, and their metric labels.

A tenant is the ``cache_salt`` of the requests that published a chunk (kvrelay.keys: the salt is also in
the chunk's address, so tenants never share a chunk); "" is the unsalted, shared address space.  The
publisher names the tenant in its reservation; the store remembers it with the chunk (and on SSD).

Owns: `TenantPolicy` (quotas and TTLs, parsed from ``T=VALUE,...`` options), `TenantBook` (bytes per tenant
and tier, each tenant's LRU of in-memory chunks, counters per metric label) and label bounding (at most
``max_labels`` tenants get a label of their own; the rest share ``OTHER``).  Must not touch: the index's
rules (index.py calls `TenantBook.change` with plain values where an entry's tier changes, under the
store's lock), pool bytes or SSD files.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable

NO_TENANT = "_none"  # metric label of the unsalted address space
OTHER = "_other"  # metric label shared by the tenants past max_labels
TIERS = ("reserved", "memory", "ssd")


def parse_per_tenant(spec: str | dict, what: str, parse: Callable[[str], float]) -> tuple[dict[str, float], float]:
    """``"a=1GiB,b=2GiB,*=512MiB"`` (or a YAML mapping) -> ({tenant: value}, default for the others (``*``),
    0 when absent).  ValueError naming ``what`` and the bad item."""
    items: list[tuple[str, str]] = []
    if isinstance(spec, dict):
        items = [(str(k), str(v)) for k, v in spec.items()]
    elif spec:
        for part in str(spec).split(","):
            name, eq, value = part.rpartition("=")
            if not eq or not name.strip():
                raise ValueError(f"{what}: {part!r} is not TENANT=VALUE (use * for every other tenant)")
            items.append((name.strip(), value.strip()))
    out: dict[str, float] = {}
    default = 0.0
    for name, raw in items:
        try:
            v = parse(raw)
        except ValueError as exc:
            raise ValueError(f"{what}: tenant {name!r}: {exc}") from None
        if not 0 <= v < float("inf"):
            raise ValueError(f"{what}: tenant {name!r}: {raw!r} must be >= 0 (0: none)")
        if name == "*":
            default = v
        else:
            out[name] = v
    return out, default


@dataclass(slots=True)
class TenantPolicy:
    """Per-tenant quota (bytes the tenant may hold in the pool: reserved + in memory; 0: none) and idle TTL
    (seconds since a chunk's last use; 0: the store's chunk_ttl)."""
    quotas: dict[str, float] = field(default_factory=dict)
    default_quota: float = 0
    ttls: dict[str, float] = field(default_factory=dict)
    default_ttl: float = 0.0

    def quota(self, tenant: str) -> int:
        return int(self.quotas.get(tenant, self.default_quota))

    def ttl(self, tenant: str, fallback: float) -> float:
        return self.ttls.get(tenant, self.default_ttl) or fallback

    @property
    def has_ttls(self) -> bool:
        return bool(self.ttls or self.default_ttl)


@dataclass(slots=True)
class Usage:
    """One tenant's bytes per tier and its in-memory chunks, oldest first (its own LRU)."""
    reserved: int = 0
    memory: int = 0
    ssd: int = 0
    lru: "OrderedDict[str, None]" = field(default_factory=OrderedDict)

    @property
    def pool_bytes(self) -> int:
        return self.reserved + self.memory


class TenantBook:
    """Usage per tenant (only tenants that hold something are kept) and counters per metric label."""

    def __init__(self, max_labels: int = 64) -> None:
        self.max_labels = max_labels
        self.usage: dict[str, Usage] = {}
        self.counters: Counter[tuple[str, str]] = Counter()  # (label, counter name)
        self._labels: dict[str, str] = {}

    def label(self, tenant: str) -> str:
        """The tenant's metric label: its name for the first ``max_labels`` tenants seen, else OTHER."""
        if not tenant:
            return NO_TENANT
        got = self._labels.get(tenant)
        if got is None:
            got = tenant if len(self._labels) < self.max_labels else OTHER
            if got != OTHER:
                self._labels[tenant] = got
        return got

    def of(self, tenant: str) -> Usage:
        u = self.usage.get(tenant)
        if u is None:
            u = self.usage[tenant] = Usage()
        return u

    def count(self, tenant: str, name: str, n: int = 1) -> None:
        if n:
            self.counters[(self.label(tenant), name)] += n

    def change(self, tenant: str, kid: str, nbytes: int, tier: str, sign: int) -> None:
        """Chunk ``kid`` of ``nbytes`` entered (sign 1) or left (sign -1) a tier; "memory" also moves it in its
        tenant's LRU."""
        u = self.of(tenant)
        setattr(u, tier, getattr(u, tier) + sign * nbytes)
        if tier == "memory":
            if sign > 0:
                u.lru[kid] = None
            else:
                u.lru.pop(kid, None)
        if sign < 0 and not (u.reserved or u.memory or u.ssd or u.lru):
            del self.usage[tenant]

    def touch(self, tenant: str, kid: str) -> None:
        u = self.usage.get(tenant)
        if u is not None and kid in u.lru:
            u.lru.move_to_end(kid)

    def snapshot(self, policy: TenantPolicy) -> dict[str, dict[str, float]]:
        """Per label: bytes per tier, quota and counters (what /metrics and stats show)."""
        out: dict[str, Counter[str]] = {}
        for tenant, u in self.usage.items():
            row = out.setdefault(self.label(tenant), Counter())
            row["reserved_bytes"] += u.reserved
            row["memory_bytes"] += u.memory
            row["ssd_bytes"] += u.ssd
            row["chunks_memory"] += len(u.lru)
            if self.label(tenant) != OTHER:
                row["quota_bytes"] = policy.quota(tenant)
        for (label, name), n in self.counters.items():
            out.setdefault(label, Counter())[name] += n
        return {k: dict(v) for k, v in out.items()}
