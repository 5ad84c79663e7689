"""Per-tenant quotas (own LRU evicted, never another tenant's; else a clear refusal), TTLs and usage
metrics with bounded label cardinality."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from tenant_helpers import CHUNK, chunk_keys_for, payload, put
from kvrelay.keys import kid_of
from kvrelay.store.clock import ManualClock
from kvrelay.store.errors import OpError
from kvrelay.store.metrics import StoreMetrics


def test_quota_evicts_own_lru_never_another_tenant(make_core):
    core = make_core(tenant_quotas=f"alice={3 * CHUNK}")
    bob = chunk_keys_for(list(range(64)), "bob")  # 8 chunks, no quota, put first: the oldest in the pool
    for i, k in enumerate(bob):
        put(core, k, payload(i), tenant="bob")
    alice = chunk_keys_for(list(range(48)), "alice")  # 6 chunks against a quota of 3
    for i, k in enumerate(alice):
        put(core, k, payload(100 + i), tenant="alice")
    held = [k for k in alice if (e := core.ix.get(kid_of(k))) is not None and e.in_memory]
    assert held == alice[-3:]  # alice's own oldest went (dropped: there is no SSD tier here)
    assert all(core.ix.get(kid_of(k)).in_memory for k in bob)  # bob's, older still, all stayed
    t = core.stats()["tenants"]
    assert t["alice"]["memory_bytes"] == 3 * CHUNK and t["alice"]["quota_evictions"] == 3
    assert t["bob"]["memory_bytes"] == 8 * CHUNK and t["bob"].get("quota_evictions", 0) == 0
    # every chunk alice holds pinned: nothing of hers can go, so the next one is refused, naming the quota
    core.lease(held, 60.0)
    more = chunk_keys_for(list(range(900, 916)), "alice")[0]
    with pytest.raises(OpError, match="tenant 'alice' is over its quota") as exc:
        put(core, more, payload(7), tenant="alice")
    assert exc.value.code == "quota" and str(3 * CHUNK) in str(exc.value)
    assert all(core.ix.get(kid_of(k)).in_memory for k in bob)
    assert core.stats()["tenants"]["alice"]["quota_refusals"] == 1
    # another tenant is not limited by alice's quota (negative control)
    put(core, chunk_keys_for(list(range(900, 916)), "carol")[0], payload(8), tenant="carol")


def test_tenant_ttl(make_core):
    clock = ManualClock()
    core = make_core(tenant_ttls="alice=0.2", clock=clock)
    a = chunk_keys_for(list(range(16)), "alice")
    b = chunk_keys_for(list(range(16)), "bob")
    for i, k in enumerate(a + b):
        put(core, k, payload(i), tenant="alice" if k in a else "bob")
    clock.advance(0.15)
    core.sweep()
    assert core.lookup(a) == len(a)  # not idle long enough yet
    clock.advance(0.1)
    core.sweep()
    assert core.lookup(a) == 0 and core.lookup(b) == len(b)  # bob has no TTL (nor a chunk_ttl)
    assert core.stats()["tenants"]["alice"]["ttl_expiries"] == len(a)


def test_metrics_per_tenant_with_bounded_labels(make_core):
    core = make_core(max_tenant_labels=2, tenant_quotas=f"t0={8 * CHUNK}")
    for n in range(4):
        keys = chunk_keys_for(list(range(16)), f"t{n}")
        for i, k in enumerate(keys):
            put(core, k, payload(i), tenant=f"t{n}")
        core.lookup(keys, tenant=f"t{n}")
        got = core.acquire(keys[0])
        assert got is not None
        core.unpin([got[0].pin])
    m = StoreMetrics(core.stats)
    text = generate_latest(m.registry).decode()
    labels = {line.split('tenant="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("kvrelay_store_tenant_bytes{")}
    assert labels == {"t0", "t1", "_other"}  # t2 and t3 share one label
    assert f'kvrelay_store_tenant_bytes{{tenant="t0",tier="memory"}} {2.0 * CHUNK}' in text
    assert f'kvrelay_store_tenant_bytes{{tenant="_other",tier="memory"}} {4.0 * CHUNK}' in text
    assert 'kvrelay_store_tenant_hit_chunks_total{tenant="t1"} 2.0' in text
    assert f'kvrelay_store_tenant_moved_bytes_total{{direction="out",tenant="t0"}} {float(CHUNK)}' in text or \
        f'kvrelay_store_tenant_moved_bytes_total{{tenant="t0",direction="out"}} {float(CHUNK)}' in text
    assert f'kvrelay_store_tenant_quota_bytes{{tenant="t0"}} {8.0 * CHUNK}' in text
